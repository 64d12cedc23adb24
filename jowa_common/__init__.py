"""What every jowa package shares and nothing else: typed user errors, atomic writes and safe loaders, dataclass
config helpers, and the Atari action table. It imports no other jowa package.

The dependency direction (checked by tests/test_dependencies.py): pipelines -> jowa_data -> jowa_model ->
jowa_common. The data pipeline tokenizes frames with the model package's tokenizer; the models never import the
data pipeline.
"""
