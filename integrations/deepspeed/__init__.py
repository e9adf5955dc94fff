"""DeepSpeed integration: fairseq training under DeepSpeed's launcher and engine, with fastpatch's
fused modules inside.

* :data:`ENTRY`: the training script DeepSpeed's launcher runs
  (``deepspeed ENTRY DATA-BIN --user-dir USER_DIR --arch ls_transformer_wmt_en_de ...
  --deepspeed_config ds_config.json``), see :mod:`.fairseq_train`;
* ``lightseq-deepspeed``: the same launch with the entry and the user dir filled in (:mod:`.cli`);
* :data:`EXAMPLE_CONFIG`: a DeepSpeed config to start from (ZeRO-2, bf16, fairseq's optimizer);
  :data:`EXAMPLE_CONFIG_DS_OPTIMIZER` lets DeepSpeed build the optimizer and LR schedule.

``fastpatch.accelerate(engine)`` on a ``DeepSpeedEngine`` accelerates ``engine.module`` (and works
before ``deepspeed.initialize`` too: the fused layers keep ordinary ``nn.Parameter`` s, which ZeRO
stages 0-2 flatten and partition like any others). Nothing here imports DeepSpeed or fairseq
until it is used.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

#: the training entry script for DeepSpeed's launcher
ENTRY = os.path.join(_HERE, "fairseq_train.py")
#: ZeRO-2 with bf16; the optimizer and LR schedule are fairseq's --optimizer / --lr-scheduler
EXAMPLE_CONFIG = os.path.join(_HERE, "ds_config.json")
#: ZeRO-2 with bf16, DeepSpeed's AdamW and WarmupLR schedule from the config
EXAMPLE_CONFIG_DS_OPTIMIZER = os.path.join(_HERE, "ds_config_adamw.json")
