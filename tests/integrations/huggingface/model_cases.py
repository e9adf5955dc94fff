"""One small model of each accelerated Hugging Face family with a padded batch (labels
included), for the tests that run the same check over all of them."""
import transformers

from helpers import padded_batch
from test_bart import model as bart_model
from test_bart import seq2seq_batch
from test_bert import bert_config
from test_gpt2 import gpt2


def bert_mlm():
    model = transformers.BertForMaskedLM(bert_config())
    ids, mask = padded_batch(model.config.vocab_size, batch=3, length=13, side="right")
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def gpt2_lm():
    model = gpt2()
    ids, mask = padded_batch(model.config.vocab_size, batch=3, length=13, side="left")
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def bart_seq2seq():
    model = bart_model("BartForConditionalGeneration")
    ids, mask, dec, dec_mask = seq2seq_batch("right", batch=3, src_len=13, tgt_len=9)
    return model, dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                       decoder_attention_mask=dec_mask, labels=dec.masked_fill(dec_mask == 0, -100))


CASES = [bert_mlm, gpt2_lm, bart_seq2seq]
IDS = ["bert_mlm", "gpt2", "bart"]
