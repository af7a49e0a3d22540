"""Checksums of the public release (*.md5, *.sha256; provenance in README.md), installed as the package data
convert.pins and read only through importlib.resources (convert.verify.resolve_pins). This file makes the folder a
regular package: as a namespace package, resources.files returned a MultiplexedPath, which the installed wheel
could not open."""
