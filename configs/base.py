r"""The base config every recipe in configs/ starts from: `mmjax.schema` (each field commented
there), plus `spec` for `config.evals.<name>` entries. Config files import only configs/.

Run:
  python -m mmjax.main --config=configs/base.py --workdir=runs/base
"""

from mmjax.eval.specs import spec
from mmjax.schema import get_config

__all__ = ['get_config', 'spec']
