"""`python -m mmjax.hf DIR`: the --config overrides that make a run's towers match a checkpoint.

DIR is a local Hugging Face checkpoint directory (or 'pkg:MODULE/sub/dir'); with these fields set,
`--config.init.text=hf:DIR` (or `.image`) starts the run from its weights.
"""

import sys

from mmjax.train import transfer

if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  print(transfer.describe(sys.argv[1]))
