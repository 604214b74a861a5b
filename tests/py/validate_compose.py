"""Validates a compose file against the Compose Specification JSON schema.

The schema is the one shipped in the docker-compose 1.29.2 wheel (compose/config/compose_spec.json),
installed without its dependencies by scripts/test.sh, so no network is needed at test time.
Usage: validate_compose.py FILE  -> exit 0 and "valid", or exit 1 and one line per error.
"""
import importlib.util
import json
import pathlib
import sys

import jsonschema
import yaml

# Locate the package without importing it (its code needs dependencies we do not install).
spec = importlib.util.find_spec("compose")
if spec is None or not spec.submodule_search_locations:
    sys.exit("docker-compose==1.29.2 is not installed: run ./scripts/test.sh")
schema_path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "config" / "compose_spec.json"
schema = json.loads(schema_path.read_text())
document = yaml.safe_load(pathlib.Path(sys.argv[1]).read_text())
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path))
for e in errors:
    print(f"{'/'.join(str(p) for p in e.path) or '<root>'}: {e.message}")
print("valid" if not errors else f"{len(errors)} error(s)")
sys.exit(1 if errors else 0)
