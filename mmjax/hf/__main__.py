"""`python -m mmjax.hf DIR`: the --config overrides that make a run's towers match a checkpoint.

DIR is a local Hugging Face checkpoint directory (or 'pkg:MODULE/sub/dir'); with these fields set,
`--config.init.text=hf:DIR` (or `.image`) starts the run from its weights. For a Llama/Qwen2
decoder the fields are the LLM embedder's `model.decoder.*`.
"""

import sys

import mmjax.hf.convert as convert
import mmjax.hf.llama as llama

if __name__ == '__main__':
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  hf_config = convert.read_config(convert.resolve_dir(sys.argv[1]))
  if hf_config.get('model_type') in convert.DECODER_FAMILIES:
    print(llama.describe(sys.argv[1]))
  else:
    print(convert.describe(sys.argv[1]))
