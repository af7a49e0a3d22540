from convert.cli import entry

entry()
