"""Write a synthetic corpus in the exact AmazonTitles-1.3MM `trn.json.gz` format.

One JSON object per line: {"uid", "title", "content", "target_ind", "target_rel"}.
The text is made up but keeps the real corpus's quirks at about its rates (empty and very
short contents, HTML entities, glued words, boilerplate tails, duplicates, [VHS] titles,
a long tail of lengths, products beyond books), and each description is built from its
title's words so that a tiny model fine-tuned on it can measurably improve.

    python scripts/make_sample.py                 # data/sample/trn.json.gz, 4,000 records
    python scripts/make_sample.py --full          # build/trn.json.gz, 2,248,619 records (~1.9 GB)

Same seed => byte-identical file: records come in fixed chunks, chunk k drawn from its own
seeded RNG, so the output does not depend on the number of worker processes; the gzip
header has mtime 0 and no file name.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from isal import isal_zlib

FULL_RECORDS = 2_248_619          # lines of the real trn.json
CHUNK = 20_000                    # records per independently seeded (and compressed) chunk
N_LABELS = 1_305_265              # label space of AmazonTitles-1.3MM (target_ind values)
LEVEL = 2                         # isal level (0-3); fixed so that the bytes are reproducible

# ---------------------------------------------------------------- vocabulary

FIRST = ["James", "Mary", "John", "Patricia", "Robert", "Linda", "Michael", "Barbara", "David",
         "Susan", "William", "Karen", "Richard", "Nancy", "Thomas", "Lisa", "Daniel", "Margaret",
         "Paul", "Sandra", "Mark", "Ashley", "George", "Emily", "Andre", "Zoë", "Renée", "José"]
LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Moore",
        "Taylor", "Anderson", "Thomas", "Jackson", "White", "Harris", "Martin", "Thompson",
        "Garcia", "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright", "O'Brien",
        "Nguyen", "Müller", "Brontë"]
PLACES = ["Paris", "Texas", "Venice", "the Highlands", "Montana", "Cairo", "Boston", "Kyoto",
          "the Valley", "Brooklyn", "Avalon", "the North", "Savannah", "Cornwall", "Alaska",
          "Dublin", "Vienna", "Santa Fe", "the Delta", "Provence", "Yorkshire", "Havana",
          "Maine", "Tuscany", "the Outback", "Chicago", "Berlin", "New Orleans", "Mexico"]
ADJ = ["Silent", "Last", "Hidden", "Lost", "Golden", "Dark", "Secret", "Little", "Wild",
       "Broken", "Forgotten", "Endless", "Crimson", "Quiet", "Perfect", "Burning", "Northern",
       "Distant", "Bitter", "Shining", "Final", "Sacred", "Stolen", "Winter", "Savage", "Gentle",
       "Painted", "Midnight", "Fallen", "Wandering", "Iron", "Glass", "Frozen", "Scarlet"]

# genre -> (title nouns, what the book is called, sentences). {n} is the title's key noun in
# lower case, {T} the title, {a} the author, {p} a place, {h} a hero's name.
BOOKS = {
    "mystery": (["Murder", "Secret", "Shadow", "Stranger", "Detective", "Alibi", "Witness"],
                "mystery novel", [
        "{T} is a gripping mystery novel by {a}.",
        "When the {n} turns up in {p}, detective {h} must find the truth before the killer strikes again.",
        "Every clue about the {n} leads {h} deeper into a web of lies.",
        "{a} keeps readers guessing until the final chapter.",
        "The {n} at the heart of this mystery is revealed only on the last page.",
        "Fans of classic detective fiction will love this twisting mystery."]),
    "romance": (["Heart", "Kiss", "Bride", "Summer", "Promise", "Wedding", "Love"], "romance novel", [
        "{T} is a heartwarming romance novel by {a}.",
        "{h} never expected to find love in {p}, but one summer changes everything.",
        "A story of the {n}, second chances and the courage to love again.",
        "{a} writes romance with warmth, humor and real emotion.",
        "Readers will fall in love with this tender story of the {n}."]),
    "fantasy": (["Dragon", "Sword", "Kingdom", "Wizard", "Crown", "Quest", "Throne"], "fantasy novel", [
        "{T} is an epic fantasy novel by {a}.",
        "In a kingdom beyond {p}, a young hero named {h} sets out to claim the {n}.",
        "Magic, dragons and ancient prophecy collide in this fantasy adventure.",
        "The quest for the {n} will test {h}'s courage and loyalty.",
        "{a} builds a rich fantasy world full of wizards, battles and wonder."]),
    "history": (["War", "Empire", "Revolution", "Republic", "Century", "Battle", "Frontier"],
                "history book", [
        "{T} is a sweeping history book by historian {a}.",
        "Drawing on letters and archives, {a} tells the story of the {n} and the people who shaped it.",
        "This history of the {n} in {p} brings the past vividly to life.",
        "Maps, photographs and a detailed timeline accompany the text.",
        "An essential history for anyone interested in the {n}."]),
    "cooking": (["Kitchen", "Recipes", "Baking", "Bread", "Soups", "Grill", "Desserts"], "cookbook", [
        "{T} is a cookbook by chef {a} with more than 150 recipes.",
        "From quick weeknight dinners to holiday feasts, this cookbook makes {n} easy.",
        "Each recipe includes step-by-step instructions, cooking times and color photographs.",
        "{a} shares the secrets of {n} learned in kitchens from {p} to New York.",
        "A must-have cookbook for every home cook who loves {n}."]),
    "self-help": (["Habits", "Success", "Mind", "Happiness", "Leadership", "Courage", "Focus"],
                  "self-help book", [
        "{T} is a practical self-help book by {a}.",
        "In this book {a} shows how small changes in {n} lead to lasting results.",
        "Filled with exercises and real stories, it will help you master your {n}.",
        "Readers learn simple steps to build {n} at work and at home.",
        "A self-help classic that has changed the lives of millions of readers."]),
    "children": (["Bunny", "Bear", "Train", "Moon", "Puppy", "Dinosaur", "Kitten"], "children's book", [
        "{T} is a charming children's book by {a}.",
        "Join the little {n} on a big adventure in this picture book for young readers.",
        "Bright illustrations and simple rhymes make the {n} a bedtime favorite.",
        "Perfect for reading aloud to children ages 3 to 7.",
        "Kids will love the funny, friendly {n} in this story."]),
    "religion": (["Faith", "Prayer", "Spirit", "Grace", "Gospel", "Psalms", "Hope"],
                 "Christian book", [
        "{T} is an inspiring Christian book by pastor {a}.",
        "Through Scripture and personal stories, {a} explores the meaning of {n} in daily life.",
        "This book offers encouragement for anyone seeking a deeper walk of {n}.",
        "Each chapter ends with questions for reflection and prayer.",
        "A devotional guide to {n} for individuals and study groups."]),
    "science": (["Universe", "Genes", "Atoms", "Evolution", "Brain", "Climate", "Ocean"],
                "science book", [
        "{T} is a fascinating science book by {a}.",
        "{a} explains the science of the {n} in clear language for the general reader.",
        "From the smallest particles to the largest galaxies, this book explores the {n}.",
        "Diagrams and examples make the latest research on the {n} easy to follow.",
        "A lively introduction to the science of the {n}."]),
    "travel": (["Beaches", "Journey", "Road", "Islands", "Mountains", "Rivers", "Coast"],
               "travel guide", [
        "{T} is a travel guide by {a}.",
        "Discover the best hotels, restaurants and sights of {n}, with maps and tips.",
        "{a} takes readers on a journey through {n} and {p}.",
        "This travel guide includes walking tours, itineraries and practical advice.",
        "An indispensable travel companion for anyone visiting {n}."]),
}

MOVIE_GENRES = {
    "western": ["Outlaw", "Sheriff", "Canyon", "Ranch", "Gunfighter"],
    "comedy": ["Wedding", "Vacation", "Roommate", "Party", "Neighbor"],
    "drama": ["River", "Letter", "Winter", "Daughter", "Promise"],
    "horror": ["House", "Curse", "Night", "Graveyard", "Shadow"],
    "action": ["Mission", "Target", "Heist", "Escape", "Commando"],
    "family": ["Puppy", "Christmas", "Adventure", "Island", "Pony"],
}
MOVIE_SENTENCES = [
    "{T} is a classic {g} film starring {a}.",
    "In this {g} movie, {a} plays a man whose life changes when the {n} arrives in {p}.",
    "The {n} sets the story in motion, and nothing in {p} is ever the same.",
    "Directed by {h2}, this {g} film was a hit with audiences and critics.",
    "A must-see {g} movie for the whole collection.",
    "Filmed on location in {p}, with a memorable score.",
]
ARTIST_WORDS = ["Blue", "Midnight", "River", "Electric", "Velvet", "Iron", "Golden", "Lonesome"]
MUSIC_GENRES = ["rock", "jazz", "country", "blues", "pop", "classical", "gospel", "folk"]
MUSIC_SENTENCES = [
    "{T} is a {g} album by {a}.",
    "Recorded in {p}, this {g} album features the hit single \"{n}\".",
    "{a} delivers {k} songs of {g} at its best on this CD.",
    "The title track \"{n}\" remains a {g} favorite.",
    "A great {g} album for fans old and new.",
]

# Non-book products: (category, brands, items, title template, sentences).
# {b} brand, {i} item, {m} material, {c} color, {f} feature, {s} size, {w} who ({wp} plural).
PRODUCTS = {
    "clothing": (["Hanes", "Levi's", "Carhartt", "Columbia", "Champion", "Dickies"],
                 ["T-Shirt", "Hoodie", "Jacket", "Jeans", "Socks", "Sweater", "Dress"],
                 "{b} {w} {m} {i}, {c}", [
        "This {w} {i} from {b} is made of soft {m} and comes in {c}.",
        "The {m} {i} is comfortable for everyday wear and easy to wash.",
        "{b} has made quality clothing since 1901; this {i} is built to last.",
        "Machine washable {m}; tumble dry low.",
        "A classic {c} {i} for {wp} in sizes S to XXL.",
        "Relaxed fit with reinforced seams for a {i} that keeps its shape."]),
    "electronics": (["Sony", "Panasonic", "Logitech", "Philips", "JVC", "Belkin"],
                    ["Headphones", "Speaker", "Keyboard", "Camera", "Charger", "Radio", "Mouse"],
                    "{b} {i} with {f}, {c}", [
        "The {b} {i} with {f} delivers reliable performance at home or on the go.",
        "This {c} {i} features {f} and a compact, lightweight design.",
        "Setup is simple: plug in the {i} and it works with most devices.",
        "{b} backs this {i} with a one-year limited warranty.",
        "Includes the {i}, a USB cable and a quick start guide.",
        "Thanks to {f}, the {i} is ideal for work, travel and gaming."]),
    "toys": (["LEGO", "Hasbro", "Mattel", "Melissa & Doug", "Fisher-Price", "Playmobil"],
             ["Building Set", "Puzzle", "Doll", "Race Car", "Play Kitchen", "Board Game"],
             "{b} {m} {i} for Kids", [
        "The {b} {m} {i} is a fun toy for kids ages {s} and up.",
        "This {i} encourages creativity, problem solving and hours of imaginative play.",
        "Made from durable, child-safe materials, the {i} is built for years of fun.",
        "Includes everything needed to start playing with the {m} {i} right out of the box.",
        "A great gift idea for birthdays and holidays.",
        "Warning: small parts; not for children under 3 years."]),
    "kitchen": (["Cuisinart", "KitchenAid", "OXO", "Lodge", "Pyrex", "Hamilton Beach"],
                ["Skillet", "Blender", "Mixing Bowl Set", "Knife", "Coffee Maker", "Toaster"],
                "{b} {s} {m} {i}", [
        "The {b} {s} {m} {i} is a kitchen essential for everyday cooking.",
        "Made of durable {m}, this {i} heats evenly and cleans up easily.",
        "Whether you cook for one or for a crowd, the {i} gets the job done.",
        "Dishwasher safe; {b} offers a limited lifetime warranty.",
        "A {s} {i} that looks great on any countertop.",
        "Home cooks and professional chefs trust {b} for quality {m} cookware."]),
}
MATERIALS = {"clothing": ["Cotton", "Fleece", "Denim", "Wool", "Polyester"],
             "toys": ["Wooden", "Deluxe", "Classic", "Magnetic", "Musical"],
             "kitchen": ["Stainless Steel", "Cast Iron", "Glass", "Ceramic", "Nonstick"]}
SIZES = {"toys": ["3", "4", "5", "6", "8"],
         "kitchen": ["10-Inch", "12-Inch", "8-Cup", "3-Quart", "2-Slice"]}
COLORS = ["Black", "Navy", "Red", "White", "Gray", "Blue", "Green", "Pink"]
FEATURES = ["Bluetooth", "Noise Cancelling", "Wireless Charging", "USB-C", "Long Battery Life"]
WHO = [("Men's", "men"), ("Women's", "women"), ("Boys'", "boys"), ("Girls'", "girls")]

# Quirks of the real corpus.
SHORT_CONTENTS = ["VHS Tape", "Paperback", "Hardcover", "Audio CD", "DVD", "Import",
                  "Kindle Edition", "Cassette", "Board book", "Spiral-bound", "Brand new."]
EDITION_TAILS = [
    "--This text refers to an out of print or unavailable edition of this title.",
    "--This text refers to the Paperback edition.",
    "--This text refers to the Hardcover edition.",
    "--This text refers to the VHS Tape edition.",
    "--This text refers to the Audio CD edition.",
]
REVIEW_SOURCES = [
    ("Publishers Weekly", "Copyright {y} Reed Business Information, Inc."),
    ("Library Journal", "Copyright {y} Reed Business Information, Inc."),
    ("Booklist", "Copyright {y} American Library Association. All rights reserved."),
    ("Kirkus Reviews", "Copyright {y} Kirkus Associates, LP. All rights reserved."),
]
REVIEW_QUOTES = ["A wonderful book.", "Highly recommended.", "Absorbing and beautifully written.",
                 "Readers will not be disappointed.", "A fine addition to any collection."]
# What the markup stripper of the real corpus left behind: words glued together.
GLUED = ["thePaperbackedition", "Editorial ReviewsFrom Publishers Weekly", "ReviewFrom the Author",
         "Product DescriptionThe", "Amazon.com ReviewThis", "this book.About the Author"]
# "&" first, so that the entities added after it are not escaped twice.
ENTITY_FOR = {"&": ["&amp;"], "'": ["&#x2019;", "&#8217;", "&#39;"], '"': ["&quot;", "&#8220;"],
              " - ": [" &#8211; ", " &mdash; ", "&#x2014;"], " ": ["&#160;"]}


# ---------------------------------------------------------------- records

def uid_for(i: int) -> str:
    """A unique 10-character ASIN-like id (B00 + 7 base-36 digits), scrambled."""
    x = (i * 2_654_435_761 + 97) % 36 ** 7
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    s = ""
    for _ in range(7):
        x, r = divmod(x, 36)
        s = digits[r] + s
    return "B00" + s


def person(rnd: random.Random) -> str:
    return f"{rnd.choice(FIRST)} {rnd.choice(LAST)}"


def capwords(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split())


def body(rnd: random.Random, sentences: list[str], target: int, **slots) -> str:
    """Sentences (the first one always, it ties the text to its title) until `target` chars.

    The others come in a shuffled order, all of them before any repeats.
    """
    parts = [sentences[0].format(**slots)]
    n = len(parts[0])
    rest: list[str] = []
    while n < target:
        if not rest:
            rest = sentences[1:]
            rnd.shuffle(rest)
        s = rest.pop().format(**slots)
        parts.append(s)
        n += len(s) + 1
    return " ".join(parts)


def content_length(rnd: random.Random) -> int:
    # Log-normal: median ~450 chars, p99 ~2,600; a few run past 4,000.
    n = int(rnd.lognormvariate(6.1, 0.78))
    return n if n <= 4800 else 4000 + rnd.randrange(800)


def product(rnd: random.Random) -> tuple[str, str, bool]:
    """A clean (title, description, is it a book/movie/album) in a random category."""
    target = content_length(rnd)
    r = rnd.random()
    if r < 0.56:                                            # books: most of the corpus
        genre = rnd.choice(list(BOOKS))
        nouns, kind, sentences = BOOKS[genre]
        noun, adj, place = rnd.choice(nouns), rnd.choice(ADJ), rnd.choice(PLACES)
        form = rnd.random()
        if form < 0.3:
            title = f"The {adj} {noun}"
        elif form < 0.45:
            title = f"{noun} in {place}"
        elif form < 0.55:
            title = f"{rnd.choice(LAST)}'s {adj} {noun}"
        elif form < 0.8:
            title = f"The {noun} of {place}: A {capwords(kind)}"
        else:
            title = f"{adj} {noun}: {rnd.choice(['A Memoir', 'Book One', 'Collected Stories', 'A Guide'])}"
        text = body(rnd, sentences, target, T=title, n=noun.lower(), a=person(rnd), p=place,
                    h=rnd.choice(FIRST))
    elif r < 0.68:                                          # movies
        genre = rnd.choice(list(MOVIE_GENRES))
        noun = rnd.choice(MOVIE_GENRES[genre])
        name = f"The {noun}" if rnd.random() < 0.5 else f"{rnd.choice(ADJ)} {noun}"
        fmt = rnd.choice(["[VHS]", "[VHS]", "[DVD]", "(Widescreen Edition)", "[Blu-ray]"])
        title = f"{name} {fmt}"
        text = body(rnd, MOVIE_SENTENCES, target, T=name, g=genre, n=noun.lower(), a=person(rnd),
                    h2=person(rnd), p=rnd.choice(PLACES))
        if "VHS" in fmt and rnd.random() < 0.5:
            text = f"This VHS tape of {name} is a {genre} classic. " + text
    elif r < 0.78:                                          # music
        genre = rnd.choice(MUSIC_GENRES)
        song = f"{rnd.choice(ADJ)} {rnd.choice(['Road', 'Heart', 'Night', 'Rain', 'Train', 'Sky'])}"
        artist = (f"The {rnd.choice(ARTIST_WORDS)} {rnd.choice(['Band', 'Brothers', 'Kings'])}"
                  if rnd.random() < 0.5 else person(rnd))
        title = song if rnd.random() < 0.6 else f"{song}: The Best of {artist}"
        text = body(rnd, MUSIC_SENTENCES, target, T=title, g=genre, n=song, a=artist,
                    p=rnd.choice(PLACES), k=rnd.randrange(8, 21))
    else:                                                   # clothing, electronics, toys, kitchen
        cat = rnd.choice(list(PRODUCTS))
        brands, items, tmpl, sentences = PRODUCTS[cat]
        slots = dict(b=rnd.choice(brands), i=rnd.choice(items), c=rnd.choice(COLORS),
                     m=rnd.choice(MATERIALS.get(cat, ["Classic"])), s=rnd.choice(SIZES.get(cat, ["1"])),
                     f=rnd.choice(FEATURES))
        slots["w"], slots["wp"] = rnd.choice(WHO)
        title = tmpl.format(**slots)
        # Product pages are shorter than book descriptions.
        text = body(rnd, sentences, target * 2 // 3, **slots)
        return title, text, False
    return title, text, True


def add_entities(rnd: random.Random, text: str, rate: float) -> str:
    """Replace some characters by HTML entities, hex and decimal mixed."""
    for plain, entities in ENTITY_FOR.items():
        if plain in text and rnd.random() < rate:
            ent = rnd.choice(entities)
            if plain == " ":
                text = text.replace(" ", ent, rnd.randrange(1, 3))
            else:
                text = text.replace(plain, ent)
    return text


def quirks(rnd: random.Random, title: str, text: str, media: bool) -> tuple[str, str]:
    """Damage a clean pair the way the real corpus is damaged."""
    r = rnd.random()
    if r < 0.38:
        return title, ""                                    # ~38 % empty content
    if r < 0.41:
        return title, rnd.choice(SHORT_CONTENTS)            # a few % very short
    if r < 0.415:
        return title, title                                 # content equal to title
    if media and rnd.random() < 0.07:                       # review quote with copyright line
        src, line = rnd.choice(REVIEW_SOURCES)
        text += (f" \"{rnd.choice(REVIEW_QUOTES)}\" --{src} "
                 + line.format(y=rnd.randrange(1993, 2006)))
    if media and rnd.random() < 0.12:                       # edition boilerplate
        text += rnd.choice(EDITION_TAILS)
    if rnd.random() < 0.04:                                 # glued words from stripped markup
        text = rnd.choice(GLUED) + " " + text.replace(". ", ".", 1)
    if rnd.random() < 0.05:                                 # stray whitespace
        text = "  " + text.replace(". ", ".\n", 1) + " "
    if rnd.random() < 0.31:                                 # ~17 % of all contents: entities
        text = add_entities(rnd, text.replace(", ", " - ", 1), 0.8)
    if rnd.random() < 0.03:
        title = add_entities(rnd, title.replace(" and ", " & ").replace(", ", " - ", 1), 1.0)
    return title, text


def dumps(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def chunk_lines(seed: int, k: int, n: int) -> bytes:
    """Records k*CHUNK .. k*CHUNK+n-1 as JSON lines, drawn from their own seeded RNG."""
    rnd = random.Random(f"titletune-sample:{seed}:{k}")
    pool: list[tuple[str, str]] = []                        # recent pairs, to duplicate
    lines = []
    for j in range(n):
        r = rnd.random()
        if pool and r < 0.02:                               # same title and content, new uid
            title, text = rnd.choice(pool)
        elif pool and r < 0.05:                             # same title, other content
            title, text = rnd.choice(pool)[0], quirks(rnd, *product(rnd))[1]
        else:
            title, text = quirks(rnd, *product(rnd))
            if rnd.random() < 0.002:
                title = rnd.choice(["It", "Up", "Om", "X"])  # too-short titles exist
            if len(pool) < 500:
                pool.append((title, text))
            else:
                pool[rnd.randrange(500)] = (title, text)
        # ~22 related products per record on average, as in the real corpus, close together
        # in label space so the sample stays small once gzipped. A tiny LCG is much faster
        # than random.sample here, and the full-size file has 50 M of them.
        m = min(200, 1 + int(rnd.expovariate(1 / 21)))
        v, x = rnd.randrange(N_LABELS - 200 * 512), rnd.getrandbits(31)
        ind = []
        for _ in range(m):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            v += 1 + (x >> 22)
            ind.append(v)
        # Same bytes as json.dumps(record, ensure_ascii=False), written directly for speed.
        lines.append(f'{{"uid": "{uid_for(k * CHUNK + j)}", "title": {dumps(title)}, '
                     f'"content": {dumps(text)}, "target_ind": [{", ".join(map(str, ind))}], '
                     f'"target_rel": [{", ".join(["1.0"] * m)}]}}')
    lines.append("")
    return "\n".join(lines).encode("utf-8")


def chunk_deflate(args: tuple[int, int, int, bool]) -> tuple[bytes, int, int]:
    """One chunk, compressed as raw deflate: (data, crc32, uncompressed length).

    Chunks are compressed independently and joined into a single gzip member (like pigz),
    so workers can run in parallel and the bytes stay the same for any worker count.
    """
    seed, k, n, last = args
    raw = chunk_lines(seed, k, n)
    comp = isal_zlib.compressobj(LEVEL, isal_zlib.DEFLATED, -15)
    data = comp.compress(raw) + comp.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)
    return data, isal_zlib.crc32(raw), len(raw)


def write(out: Path, records: int, seed: int, workers: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = [(seed, k, min(CHUNK, records - k * CHUNK), k == (records - 1) // CHUNK)
              for k in range((records + CHUNK - 1) // CHUNK)]
    tmp = out.with_name(out.name + ".tmp")
    crc, size, t0 = 0, 0, time.time()
    with open(tmp, "wb") as f:
        # gzip header: deflate, no flags (no file name), mtime 0, OS unknown
        f.write(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff")
        with Pool(workers) if workers > 1 and len(chunks) > 1 else _Serial() as pool:
            for i, (data, c, n) in enumerate(pool.imap(chunk_deflate, chunks)):
                f.write(data)
                crc = isal_zlib.crc32_combine(crc, c, n)
                size += n
                if len(chunks) > 1:
                    print(f"\r{i + 1}/{len(chunks)} chunks", end="", file=sys.stderr, flush=True)
        f.write(struct.pack("<II", crc, size & 0xFFFFFFFF))
    os.replace(tmp, out)
    print(f"{'' if len(chunks) == 1 else chr(10)}{out}: {records:,} records, {size:,} bytes "
          f"uncompressed, {out.stat().st_size:,} compressed, {time.time() - t0:.1f} s")


class _Serial:
    """Stand-in for a Pool when one process is enough (the small sample)."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items):
        return map(fn, items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="default: data/sample/trn.json.gz (build/trn.json.gz with --full)")
    ap.add_argument("--records", type=int, help="default: 4000 (2,248,619 with --full)")
    ap.add_argument("--full", action="store_true", help="the full-size corpus, for benchmarks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    out = args.out or root / ("build/trn.json.gz" if args.full else "data/sample/trn.json.gz")
    records = args.records or (FULL_RECORDS if args.full else 4000)
    if records < 1:
        ap.error("--records must be at least 1")
    write(out, records, args.seed, args.workers)


if __name__ == "__main__":
    main()
