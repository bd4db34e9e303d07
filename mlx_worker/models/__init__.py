"""Models (protocol/README.md, "load"): ``registry`` (the models held, load and
unload), ``loaded`` (the LoadedModel record, at the bottom), ``config``
(config.json helpers), ``loader`` (the loader interface), ``text`` (the text
loader), ``fixups`` (what every generating loader does to its tokenizer),
``loading`` (progress and cancel), ``checks`` (a folder checked before loading)."""
