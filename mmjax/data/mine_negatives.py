"""Moved to the CLI layer (it embeds with a trained model): `python -m mmjax.cli.mine_negatives`."""

if __name__ == '__main__':  # The old command name still runs it.
  import runpy
  runpy.run_module('mmjax.cli.mine_negatives', run_name='__main__')
