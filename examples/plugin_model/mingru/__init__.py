"""minGRU for seqbench (an example plug-in): ``pip install -e examples/plugin_model``, then
``seqbench model=mingru_tiny task=copy trainer=smoke``."""
