"""The offline demo: a drawn map collection (``maps``) and the steps that load, train and serve it (``run``)."""
