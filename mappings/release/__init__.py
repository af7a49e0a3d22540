"""Release metadata (*.toml): the fields of a published config.json that no params.json carries, installed as the
package data convert.mappings.release and read only through importlib.resources, like the naming tables."""
