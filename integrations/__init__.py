"""Framework adapters, installed as ``fastpatch.integrations``: ``huggingface``, ``fairseq``,
``deepspeed``. Each imports its framework lazily, only when a model of it is accelerated."""
