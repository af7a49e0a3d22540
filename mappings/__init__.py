"""The mapping tables (*.toml), installed as the package data convert.mappings and read only through
importlib.resources (convert.mapping.data_dir). This file makes the folder a regular package: as a namespace package,
resources.files returned a MultiplexedPath, which the installed wheel could not open."""
