"""The bundled profiles (NAME.toml), for `--profile NAME`. This directory installs as the data
package llmc.bundled_profiles (package-dir in pyproject.toml); llmc.resources finds it."""
