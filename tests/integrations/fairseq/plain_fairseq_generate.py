"""``fairseq-generate`` as a plain fairseq user runs it under torch >= 2.6: no ``--user-dir``,
only fairseq's pickled types allow-listed for ``torch.load``. Used by the tests."""
import sys

from fastpatch.integrations.fairseq.checkpoints import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from fairseq.models import ARCH_MODEL_REGISTRY  # noqa: E402
from fairseq_cli.generate import cli_main  # noqa: E402

assert not any(name.startswith("ls_") for name in ARCH_MODEL_REGISTRY), "fastpatch got registered"
sys.argv = ["fairseq-generate"] + sys.argv[1:]
cli_main()
