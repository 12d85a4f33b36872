"""Config files for ``--config`` (ml_collections' config_flags): each defines ``get_config(arg)`` and is named by
its path or, through ``experiments.harness.resolve_config_name``, by its name. ml_collections loads a config file
by its path, outside any package, and this folder is ``experiments.configs`` in the repository but
``md_meta_experiments.configs`` installed; so a config that builds on another reads that file by path,
``runpy.run_path(os.path.join(os.path.dirname(__file__), 'NAME.py'))``, which works in every case."""
