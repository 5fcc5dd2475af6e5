"""The toy world that `python toy.py` runs: world.py (the generator), tiny_clip.py (the tiny CLIP and its
pre-training), run.py (the stages through their command lines), report.py (metrics and tables from the
hidden labels), pictures.py (the figures of docs/how_it_works.md), floors.json (CI's learning floors)."""
