"""Build the tiny built-in demo model shipped in ``minisgl/models/demo/``.

The demo model is a 2-layer Llama with random weights and a 2048-entry
byte-level BPE tokenizer.  It is *not* meant to produce sensible text: it
exists so that the server, the CLI and the test-suite can run fully offline
without downloading anything.  The output is a regular Hugging Face model
folder (``config.json``, ``generation_config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``)
that ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` can load.

The build is fully deterministic: running the script twice produces
byte-identical files.  Tokenizer training is forced to run single-threaded
and the weights come from a ``torch.Generator`` seeded with 0.

Usage::

    python scripts/make_demo_model.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# ``tokenizers`` is imported lazily (in ``build_tokenizer``) so that these are
# in place before its Rayon thread pool is created: single-threaded BPE
# training is what makes ``tokenizer.json`` byte-for-byte reproducible.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "minisgl" / "models" / "demo"

# --------------------------------------------------------------------------- #
# Model / tokenizer hyper-parameters
# --------------------------------------------------------------------------- #
VOCAB_SIZE = 2048
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 352
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
MAX_POSITIONS = 2048
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
INIT_STD = 0.02
NORM_NOISE_STD = 0.02
SEED = 0

SPECIAL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT_ID = 0
IM_START_ID = 1
IM_END_ID = 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# --------------------------------------------------------------------------- #
# Training corpus (original prose written for this script)
# --------------------------------------------------------------------------- #
BASE_TEXT = """\
The morning was cold and bright. A thin layer of frost covered the grass in the
park, and the people who walked their dogs there wore thick coats and scarves.
By noon the sun had warmed the air, the frost had melted, and children were
playing on the swings while their parents talked on the benches nearby.

Cooking a simple meal at home is easier than many people think. Start with a
pot of salted water for the pasta. While the water heats, slice an onion, chop
two cloves of garlic, and warm some olive oil in a wide pan. Add the onion
first, then the garlic, and stir until everything smells sweet. A can of
tomatoes, a pinch of salt, and a few leaves of fresh basil turn it into a sauce.

A computer program is a list of instructions that a machine can follow. The
instructions are written in a programming language such as Python, C, or Rust.
Good programs are easy to read, easy to test, and easy to change. When a
program does something unexpected, the programmer looks for the bug, writes a
small test that shows the problem, and then fixes the code so the test passes.

Large language models predict the next token in a sequence of text. During
training they read a huge amount of writing and slowly adjust millions or
billions of numbers called weights. At inference time the model receives a
prompt, computes a probability for every token in its vocabulary, picks one,
and repeats the process until it produces an end token or reaches a limit.
An inference server keeps many requests in flight at once. It batches them
together, stores the attention keys and values in a cache, and schedules work
so that the accelerator stays busy and every user gets a fast response.

Traveling by train gives you time to look out of the window and think. The
fields roll past, small towns appear and disappear, and rivers shine under old
stone bridges. Some travelers read a book, some sleep, and some simply watch
the landscape change from forests to hills to the wide flat coast.

In the garden, the tomatoes need water every evening during the summer. The
beans climb up their poles, the lettuce grows quickly in the shade, and the
sunflowers turn their heavy heads to follow the light. A gardener learns to be
patient, because nothing grows faster just because you want it to.

Music is made of rhythm, melody, and harmony. A drummer keeps the beat, a bass
player connects the rhythm to the chords, and a singer carries the melody that
people remember. Learning an instrument takes practice: a few minutes every day
is better than one long session once a week.

Scientists ask questions and design experiments to answer them. They measure
carefully, record their results, and share their methods so that other people
can repeat the work. A result that nobody can reproduce is not yet knowledge.
Physics studies energy and motion, chemistry studies matter and reactions,
biology studies living things, and mathematics provides the language for all
of them.

User: Can you help me write a short email to my team?
Assistant: Of course. Here is a draft: "Hi everyone, thank you for your hard
work this week. The release is ready, the tests are green, and the documents
are up to date. Let's meet on Monday at ten to plan the next steps. Best regards."

User: What is the capital of France?
Assistant: The capital of France is Paris.

User: How many days are there in a week?
Assistant: There are seven days in a week: Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday, and Sunday.

User: Explain what a cache is in one sentence.
Assistant: A cache is a small, fast storage area that keeps copies of data you
are likely to need again, so you do not have to fetch it from a slower place.

The history of writing begins with marks pressed into clay and scratched onto
bone. Over thousands of years those marks became alphabets, and alphabets made
it possible to record laws, stories, recipes, letters, and accounts. Printing
later allowed books to be copied quickly, and libraries grew from a few shelves
into enormous buildings full of knowledge.

Weather forecasts combine observations from satellites, balloons, ships, and
ground stations. Meteorologists feed these measurements into numerical models
that simulate the atmosphere on powerful computers. The forecast for tomorrow
is usually reliable, while a forecast for next month is only a rough guide.

A healthy breakfast might include oatmeal with fruit, yogurt with honey, eggs
with toast, or a bowl of cereal with milk. Drinking water throughout the day,
walking outside, and sleeping enough are simple habits that support health.

The city council voted to build a new bicycle lane along the main avenue.
Supporters said it would reduce traffic and pollution, while shop owners worried
about parking. After several public meetings, the council chose a compromise:
wider sidewalks, protected lanes, and a small parking garage behind the market.

Mathematics often starts with counting, then moves to addition, subtraction,
multiplication, and division. Later come fractions, decimals, percentages,
equations, geometry, probability, statistics, algebra, and calculus. Each idea
builds on earlier ones, like the floors of a tall building.

The ocean covers most of the surface of the planet. Its currents carry heat
from the equator toward the poles, its waves shape the beaches, and its tides
rise and fall twice a day because of the gravity of the moon and the sun.
Whales, dolphins, sharks, turtles, octopuses, and countless tiny plankton live
in its water.

def add(a: int, b: int) -> int:
    return a + b

for i in range(10):
    print(i, i * i)

The numbers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 32, 64, 100, 128, 256,
512, 1000, 1024, 2048, and 4096 appear often in computing. Dates look like
2024-01-15 and times look like 09:30 or 17:45. Prices look like $3.50 or 12.99.
"""

SUBJECTS = [
    "The teacher",
    "A small child",
    "My neighbor",
    "The old engineer",
    "Our new student",
    "The careful doctor",
    "A tired traveler",
    "The young artist",
    "Every farmer",
    "The quiet librarian",
    "A friendly robot",
    "The busy chef",
    "Her brother",
    "His grandmother",
    "The research team",
    "A curious cat",
]
VERBS = [
    "found",
    "opened",
    "carried",
    "painted",
    "repaired",
    "described",
    "borrowed",
    "cleaned",
    "measured",
    "explained",
    "ordered",
    "watched",
    "remembered",
    "visited",
    "discovered",
    "organized",
]
OBJECTS = [
    "a wooden box",
    "the broken window",
    "an empty bottle",
    "the blue notebook",
    "a heavy suitcase",
    "the yellow bicycle",
    "a strange letter",
    "the kitchen table",
    "an old photograph",
    "the city map",
    "a warm blanket",
    "the second chapter",
    "a silver spoon",
    "the garden gate",
    "a paper airplane",
    "the mountain trail",
]
PLACES = [
    "at the station",
    "in the library",
    "near the river",
    "behind the school",
    "on the third floor",
    "under the bridge",
    "inside the museum",
    "across the street",
    "beside the lake",
    "in the village market",
    "at the airport",
    "during the storm",
]
TIMES = [
    "yesterday",
    "this morning",
    "last winter",
    "on Friday evening",
    "after lunch",
    "before sunrise",
    "every Sunday",
    "in early spring",
    "two weeks ago",
    "late at night",
]
_EXTRA_WORDS_TEXT = """\
ability absolute academy accept account achieve acid across action active
actual address adult advance advice afford afraid agency agree ahead aircraft
alarm album alive allow almost alone already also although always amazing
amount ancient angle animal answer anxious apartment appear apple approach
approve area argue arrive article artist assume attack attempt attend attitude
author autumn average avoid award aware balance ball band bank basket battery
beach beauty become bedroom beer begin behavior believe belong benefit beyond
billion bird birthday bitter blade blanket blind block blood board boat body
bone border bottle bottom bowl brain branch brave bread break breath brick
bright bring broad brown budget build burn butter button cabin cable camera
campaign candle capital captain carbon career careful carpet castle catch
cause ceiling center century certain chain chair chance change channel chapter
charge cheap check cheese chicken chief choice church circle citizen claim
class clean clear climb clock close cloth cloud coach coast coffee collect
college colony column combine comfort common company compare complete concept
concert confirm connect consider contain content contest context control
cotton count country couple courage course cousin cover crash cream create
credit crime crowd culture curtain customer cycle damage dance danger daughter
dealer debate decade decide declare deep defend degree deliver demand deny
depend desert design desk detail develop device diamond diet differ dinner
direct dirty discuss disease distance divide doctor dollar domain double doubt
dozen drama drawer dream dress drink drive during duty eager early earth
easily economy edge editor effect effort eight either elbow election element
elephant eleven emerge emotion empire employ enable energy engine enjoy enough
ensure enter entire equal error escape estate event evidence exact example
excite exercise exist expand expect expert explain export extend extra fabric
factor factory fail fair faith family famous fancy farm fashion father fault
favor feature federal feeling female fence festival fiber field fifteen fight
figure final finance finger finish fire firm fish flag flame flat flavor
flight float flood flower fluid focus follow force forest forget formal
fortune forward frame free fresh friend front frozen fruit fuel function funny
future galaxy game garage gather general gentle giant gift glass global glove
goal golden govern grain grand grass gravity great green ground group guard
guess guest guide guitar habit hair hammer handle happen harbor hardly harvest
health heart heaven height hello helmet hidden highway hire history hobby
holiday hollow honest honey horizon horse hospital hotel house human humor
hundred hunger hunt husband idea ignore image impact import improve include
income index indoor infant inform injury insect insist install instead island
issue jacket jelly jewel join journey judge juice jungle junior justice kettle
keyboard kidney kind king kitchen knee knife knock label labor ladder lady
lamp language laptop large laugh launch lawyer layer leader leather lecture
legal lemon length lesson level liberty light limit liquid listen little
lizard local logic lonely lucky lunch machine magnet mammal manage manual
marble margin marine market master matter meadow medal medium member memory
mental mention merit message metal method middle mild million mineral minor
mirror mission mobile model modern moment money monitor month moral motor
mountain mouse movie muscle museum mystery narrow nation native nature needle
nephew nerve network neutral never night noble noise normal north novel number
nurse object ocean office often olive orange orbit orchard origin outdoor
oxygen oyster package paddle palace panel parade parent parrot partner patient
pattern peace peanut pencil people pepper perfect permit person phone piano
picture pilot planet plastic plenty pocket poem police polite pool popular
portion potato powder power praise prefer present pretty price pride prince
print prison private problem process produce profit project promise proof
proper protect proud public pumpkin purple puzzle quality quarter queen quick
rabbit radio rail rain random rapid rather reason record region regular relax
remain repeat report rescue result return review reward rhythm ribbon rice
rich ride right ring river road rocket royal rubber rural saddle safety salad
salmon sample sand satisfy sauce scale scene scheme school science screen
season second secret select senior sense series service settle seven shadow
shallow share shelf shell shelter shift shine shoulder signal silent silk
silver simple sister skill slender smooth snake soccer social soldier solid
solve source south space spider spirit split sport spread square stable
stadium staff stage stair stamp standard star steel stomach stone storage
story strategy street strong student style subject sugar summer supply surface
surprise survey sweet symbol system table talent target taste teach tennis
thank theory thick thirty thought thunder ticket tiger timber tissue title
toast today tomato tongue tool topic tower town toy track trade traffic train
travel treasure tribe trick trouble truck trust truth tunnel turkey twelve
twenty typical umbrella uncle unique unit universe update upper urban useful
usual valley value vapor vehicle velvet venture version vessel victory video
village violin virus visit visual vital voice volume voyage wagon wallet
wander warm warning wealth weapon weather wedding weekend welcome western
wheat wheel whisper window winter wisdom witness wonder wooden worker world
worry writer yellow young youth zebra zero zone
"""
EXTRA_WORDS: list[str] = _EXTRA_WORDS_TEXT.split()

QUESTIONS = [
    ("What color is the sky on a clear day?", "It is usually blue."),
    (
        "How do plants make food?",
        "They use sunlight, water, and air in a process called photosynthesis.",
    ),
    ("Why do we sleep?", "Sleep helps the body rest and the brain store memories."),
    ("What is two plus three?", "Two plus three equals five."),
    (
        "Where does rain come from?",
        "Rain falls from clouds when tiny water droplets join together.",
    ),
    (
        "Who writes software?",
        "Programmers and engineers write software, often working in teams.",
    ),
    (
        "When should I water the garden?",
        "Early morning or evening is best, when the sun is not too strong.",
    ),
    (
        "Which animal is the largest?",
        "The blue whale is the largest animal known to have lived.",
    ),
]


def corpus(seed: int = SEED) -> Iterator[str]:
    """Yield a deterministic English training corpus, one chunk at a time."""
    rng = random.Random(seed)
    for _ in range(4):
        yield BASE_TEXT
    for i in range(3000):
        sentence = (
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} "
            f"{rng.choice(PLACES)} {rng.choice(TIMES)}."
        )
        if i % 5 == 0:
            n = rng.randint(0, 9999)
            sentence += (
                f" It cost {n // 100}.{n % 100:02d} dollars and took {rng.randint(1, 59)} minutes."
            )
        if i % 7 == 0:
            question, answer = QUESTIONS[rng.randrange(len(QUESTIONS))]
            sentence += f"\nUser: {question}\nAssistant: {answer}"
        if i % 2 == 0:
            picked = rng.sample(EXTRA_WORDS, 8)
            sentence += f" Then came the {picked[0]}, the {picked[1]} and the {picked[2]}."
            sentence += f" {picked[3].capitalize()} and {picked[4]} meant {picked[5]}, {picked[6]} or {picked[7]}."
        yield sentence + "\n"


# --------------------------------------------------------------------------- #
# Builders
# --------------------------------------------------------------------------- #
def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer (special tokens get ids 0, 1, 2)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer vocab size is {tokenizer.get_vocab_size()}, expected {VOCAB_SIZE}; enlarge the corpus"
        )
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token!r} does not have id {expected_id}")
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    """Contents of ``tokenizer_config.json``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict[str, Any]:
    """Contents of ``special_tokens_map.json``."""
    return {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    }


def model_config() -> dict[str, Any]:
    """Contents of ``config.json`` (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": RMS_NORM_EPS,
        # transformers 4.x reads ``rope_theta``; 5.x reads ``rope_parameters``.
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "pad_token_id": ENDOFTEXT_ID,
        # transformers 4.x uses ``torch_dtype``; 5.x renamed it to ``dtype``.
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def generation_config() -> dict[str, Any]:
    """Contents of ``generation_config.json``."""
    return {
        "bos_token_id": None,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
    }


def build_weights() -> dict[str, torch.Tensor]:
    """Random bfloat16 weights with standard HF Llama names (``lm_head`` is tied)."""
    gen = torch.Generator().manual_seed(SEED)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * INIT_STD).to(torch.bfloat16)

    def norm(size: int) -> torch.Tensor:
        return (1.0 + torch.randn(size, generator=gen) * NORM_NOISE_STD).to(torch.bfloat16)

    q_dim = NUM_HEADS * HEAD_DIM
    kv_dim = NUM_KV_HEADS * HEAD_DIM
    weights: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": matrix(VOCAB_SIZE, HIDDEN_SIZE)
    }
    for layer in range(NUM_LAYERS):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = norm(HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.q_proj.weight"] = matrix(q_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.k_proj.weight"] = matrix(kv_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.v_proj.weight"] = matrix(kv_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.o_proj.weight"] = matrix(HIDDEN_SIZE, q_dim)
        weights[f"{prefix}.post_attention_layernorm.weight"] = norm(HIDDEN_SIZE)
        weights[f"{prefix}.mlp.gate_proj.weight"] = matrix(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[f"{prefix}.mlp.up_proj.weight"] = matrix(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[f"{prefix}.mlp.down_proj.weight"] = matrix(HIDDEN_SIZE, INTERMEDIATE_SIZE)
    weights["model.norm.weight"] = norm(HIDDEN_SIZE)
    return {name: t.contiguous() for name, t in weights.items()}


README_TEXT = """\
# minisgl built-in demo model

A tiny Llama-architecture model (2 layers, hidden size 128, 2048-token
byte-level BPE vocabulary, ChatML chat template) in standard Hugging Face
format.

**The weights are random.** The model generates gibberish; it exists only so
that the server, the CLI and the tests can run completely offline, without
downloading a real checkpoint.

Files:

- `config.json`, `generation_config.json` - model / generation configuration
- `model.safetensors` - bfloat16 weights (tied embeddings, no `lm_head`)
- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` -
  tokenizer (`<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2)

Everything here is generated deterministically. To rebuild it, run from the
repository root:

```
python scripts/make_demo_model.py
```
"""


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as pretty-printed JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    """Build every file of the demo model into the output directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", tokenizer_config())
    write_json(out / "special_tokens_map.json", special_tokens_map())
    write_json(out / "config.json", model_config())
    write_json(out / "generation_config.json", generation_config())
    save_file(build_weights(), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(README_TEXT, encoding="utf-8")

    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>9}  {path}")


if __name__ == "__main__":
    main()
