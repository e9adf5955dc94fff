"""What users do around a model keeps working after accelerate: Trainer, pipelines, compile."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fastpatch  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "small", "ran", "home", "fast"]


def word_tokenizer(kind):
    """A local word-level tokenizer (no hub): BERT-style or GPT-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                unk_token="<unk>", eos_token="<eos>")


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, pad_token_id=0, **kw)


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=24, length=10):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, len(WORDS) + 5, (n, length), generator=g)
        self.labels = (self.ids[:, 0] % 2)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return dict(input_ids=self.ids[i], attention_mask=torch.ones_like(self.ids[i]), labels=self.labels[i])


def test_trainer_train_evaluate_save_resume(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=2))
    reference = copy.deepcopy(model)
    fastpatch.accelerate(model)
    args = dict(per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3, save_steps=3,
                logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "fast"), **args), train_dataset=TinyDataset(), eval_dataset=TinyDataset(8))
    ref_trainer = transformers.Trainer(model=reference, args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "ref"), **args), train_dataset=TinyDataset(), eval_dataset=TinyDataset(8))
    fast_log = trainer.train()
    ref_log = ref_trainer.train()
    assert abs(fast_log.training_loss - ref_log.training_loss) < 1e-4
    assert abs(trainer.evaluate()["eval_loss"] - ref_trainer.evaluate()["eval_loss"]) < 1e-4
    # resume from the mid-run checkpoint: a vanilla-format checkpoint loads into the fused model
    resumed = transformers.Trainer(model=fastpatch.accelerate(transformers.BertForSequenceClassification(
        bert_config(num_labels=2))), args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "fast"), **args), train_dataset=TinyDataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "fast" / "checkpoint-3"))
    assert fastpatch.report(resumed.model).replaced


def test_fill_mask_and_text_classification_pipelines():
    tok = word_tokenizer("bert")
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(bert_config()).eval()
    fast = fastpatch.accelerate(copy.deepcopy(mlm))
    text = "the cat [MASK] on the mat"
    a = transformers.pipeline("fill-mask", model=mlm, tokenizer=tok)(text)
    b = transformers.pipeline("fill-mask", model=fast, tokenizer=tok)(text)
    assert [r["token"] for r in a] == [r["token"] for r in b]
    clf = transformers.BertForSequenceClassification(bert_config(num_labels=3)).eval()
    fast_clf = fastpatch.accelerate(copy.deepcopy(clf))
    batch = ["the cat sat", "a big dog ran home fast"]
    ra = transformers.pipeline("text-classification", model=clf, tokenizer=tok)(batch)
    rb = transformers.pipeline("text-classification", model=fast_clf, tokenizer=tok)(batch)
    assert [r["label"] for r in ra] == [r["label"] for r in rb]
    for x, y in zip(ra, rb):
        assert abs(x["score"] - y["score"]) < 1e-5


def test_text_generation_pipeline_with_streamer(capsys):
    tok = word_tokenizer("gpt")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(WORDS) + 3, n_embd=32, n_layer=2, n_head=4,
                                     pad_token_id=0, eos_token_id=2, bos_token_id=2)
    gpt = transformers.GPT2LMHeadModel(config).eval()
    fast = fastpatch.accelerate(copy.deepcopy(gpt))
    kwargs = dict(max_new_tokens=8, do_sample=False)
    a = transformers.pipeline("text-generation", model=gpt, tokenizer=tok)("the cat", **kwargs)
    streamer = transformers.TextStreamer(tok)
    b = transformers.pipeline("text-generation", model=fast, tokenizer=tok)("the cat", streamer=streamer, **kwargs)
    assert a[0]["generated_text"] == b[0]["generated_text"]
    assert capsys.readouterr().out.strip(), "the streamer printed nothing"


def test_torch_compile_of_accelerated_model():
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    fast = fastpatch.accelerate(copy.deepcopy(model))
    ids = torch.randint(5, 17, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    compiled = torch.compile(fast, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, model(input_ids=ids, attention_mask=mask).last_hidden_state,
                               rtol=1e-5, atol=1e-5)
