"""`python -m mmjax.hf DIR`: the --config overrides that make a run's towers match a checkpoint.

DIR is a local Hugging Face checkpoint directory (or 'pkg:MODULE/sub/dir'); with these fields set,
`--config.init.text=hf:DIR` (or `.image`) starts the run from its weights. For a Llama/Qwen2
decoder the fields are the LLM embedder's `model.decoder.*`.
"""

import sys

import mmjax.command as command
import mmjax.hf.convert as convert
import mmjax.hf.llama as llama
import mmjax.hf.storage as storage
from mmjax.hf.families import DECODER_FAMILIES


def describe(args, positional: list[str]) -> str:
  """The command: prints (and returns) the overrides for the checkpoint DIR."""
  del args
  if len(positional) != 1:
    sys.exit(__doc__)
  hf_config = storage.read_config(storage.resolve_dir(positional[0]))
  if hf_config.get('model_type') in DECODER_FAMILIES:
    text = llama.describe(positional[0])
  else:
    text = convert.describe(positional[0])
  print(text)
  return text


main = command.Command(lambda flag_values: None, describe, positional=True)

if __name__ == '__main__':
  main.main()
