#!/usr/bin/env bash
# Wheels for a GPU machine without internet (CPython 3.12, x86_64), fetched where pip works,
# into the git-ignored .whl/ of the repository root (run from there):
#   .whl/base     pulp, highspy, gguf, flexgen 0.1.8 (flexrun's search and the FlexGen peer)
#   .whl/peers    deepspeed (built here from its sdist, ops left to its JIT), airllm, pydantic
#   .whl/raydeps  jsonschema and its needs (ray's, missing from a bare torch image)
#   .whl/ray1, .whl/ray2  the ray wheel (79 MB) cut in two parts of < 40 MB, for transfers
#                 capped below its size; .whl/ray2/SHA256 checks the joined wheel
# Install there: python3 -m pip install --no-index --no-deps --target DIR .whl/base/*.whl ...
# and the joined ray wheel: cat part.aa part.ab > ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
set -euo pipefail
P=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
   --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
   --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { local d=$1; shift; mkdir -p ".whl/$d"; python3 -m pip download -q "${P[@]}" -d ".whl/$d" "$@"; }
# pulp 4 needs orloge (not a wheel of its own set): 3.3.2 as on the CPU machines
dl base pulp==3.3.2 highspy==1.16.0 gguf==0.19.0 flexgen==0.1.8
dl peers airllm==4.0.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0
dl raydeps jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
    rpds-py==2026.9.1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" deepspeed==0.19.8
tar xzf "$tmp/deepspeed-0.19.8.tar.gz" -C "$tmp"
root=$PWD
(cd "$tmp/deepspeed-0.19.8" && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps \
    --no-build-isolation -w "$root/.whl/peers" .)
python3 -m pip download -q "${P[@]}" -d "$tmp" ray==2.60.0
mkdir -p .whl/ray1 .whl/ray2
(cd "$tmp" && sha256sum ray-2.60.0-*.whl > "$root/.whl/ray2/SHA256" && split -b 38M ray-2.60.0-*.whl part.)
mv "$tmp/part.aa" .whl/ray1/ && mv "$tmp/part.ab" .whl/ray2/
du -sh .whl/*
