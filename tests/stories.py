"""Small TinyStories-like fixtures that tests write for themselves (no dataset needed)."""
import gzip
import random

EOT = "<|endoftext|>"


def make_stories(n, seed):
    rng = random.Random(seed)
    names, things, places = ["Lily", "Tom", "Mia", "Ben"], ["ball", "red kite", "little dog", "big tree"], \
        ["park", "garden", "beach", "forest"]
    stories = []
    for _ in range(n):
        name, thing, place = rng.choice(names), rng.choice(things), rng.choice(places)
        stories.append(f"Once upon a time, {name} went to the {place}. {name} saw a {thing} and smiled.\n"
                       f"\"Look!\" said {name}. The café was naïve 🙂 and they were happy.")
    return stories


def write_stories(path, stories):
    text = "".join(f"\n{s}\n{EOT}\n" for s in stories)   # stray blank lines are stripped away by data.py
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
