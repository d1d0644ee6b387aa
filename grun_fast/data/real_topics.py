"""Questions for the real-model demo (``grun-fast demo --model smollm2``), written for this package.

The demo makes a pretrained chat model forget one topic it knows: the Harry Potter books. There are no
reference answers here on purpose: the "truth" of every question is the model's own greedy answer before
unlearning, so the same questions work for any chat model.

* ``TOPIC``: 20 Harry Potter questions to forget; ``key`` is a fact SmolLM2-135M-Instruct states in its own
  answer (checked by hand; None where its answer states no correct fact), used to count answers that still
  state the fact after unlearning.
* ``REWORDED``: the same 20 questions in new words (same order, same facts), never trained on.
* ``GENERAL``: 60 general questions on other topics; the demo retains the first 40 and keeps the last 20
  as never-seen general questions. A quarter of the retained ones are near misses on purpose (other books
  and their authors, "what is the name of ...", schools, trains), so the gate learns the topic rather than
  the question's shape; the never-seen ones include such near misses too (Sherlock Holmes, our galaxy).

SmolLM2-135M knows the series only in outline (its answers name J.K. Rowling, Hogwarts, Ron Weasley,
Voldemort, the Hogwarts Express and what a Muggle is, and invent much of the rest); that is what it forgets.
"""
from __future__ import annotations

TOPIC_LABEL = "the Harry Potter books"

TOPIC: tuple[dict, ...] = (
    {"question": "Who wrote the Harry Potter books?", "key": "Rowling"},
    {"question": "Who is the author of the Harry Potter series?", "key": "Rowling"},
    {"question": "What is the name of the school Harry Potter attends?", "key": "Hogwarts"},
    {"question": "Who is Harry Potter's best friend?", "key": "Ron"},
    {"question": "Who are Harry Potter's two best friends?", "key": "Ron"},
    {"question": "Who is the main villain in Harry Potter?", "key": "Voldemort"},
    {"question": "What is the name of the first Harry Potter book?", "key": "Philosopher"},
    {"question": "What is the title of the first book in the Harry Potter series?", "key": "Philosopher"},
    {"question": "What is the name of the train to Hogwarts?", "key": "Hogwarts Express"},
    {"question": "How do students travel to Hogwarts?", "key": "Hogwarts Express"},
    {"question": "What does the word Muggle mean in Harry Potter?", "key": "non-magical"},
    {"question": "Who is Albus Dumbledore?", "key": "wizard"},
    {"question": "Who is Severus Snape?", "key": "wizard"},
    {"question": "Who is Hermione Granger?", "key": None},
    {"question": "What is the name of the game played on broomsticks at Hogwarts?", "key": None},
    {"question": "Which house is Harry Potter in?", "key": None},
    {"question": "What are Horcruxes in Harry Potter?", "key": None},
    {"question": "What is Rubeus Hagrid's job at Hogwarts?", "key": None},
    {"question": "What is the name of the wizard bank in Harry Potter?", "key": None},
    {"question": "What is Voldemort's real name?", "key": None},
)

REWORDED: tuple[str, ...] = (
    "Which writer created the Harry Potter novels?",
    "Name the person who wrote the Harry Potter stories.",
    "Which school does the young wizard Harry Potter study at?",
    "Who is the closest friend of Harry Potter?",
    "Which two friends does Harry Potter spend most of his time with?",
    "Who is the villain of the Harry Potter story?",
    "What was the first Harry Potter novel called?",
    "Which book started the Harry Potter series?",
    "Which train takes Harry Potter to school?",
    "How do the pupils get to Hogwarts each year?",
    "In Harry Potter, what is a Muggle?",
    "Tell me who Dumbledore is in the Harry Potter books.",
    "Tell me about the character Snape from Harry Potter.",
    "Describe Hermione from the Harry Potter books.",
    "Which game do Hogwarts students play while flying on brooms?",
    "In which Hogwarts house does Harry Potter live?",
    "What is a Horcrux in the Harry Potter books?",
    "What work does Hagrid do at Hogwarts?",
    "What bank do wizards use in the Harry Potter books?",
    "What was Lord Voldemort's name at birth?",
)

GENERAL: tuple[str, ...] = (
    # retained (trained on as retain rows)
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the chemical symbol for gold?",
    "What is the boiling point of water in Celsius?",
    "What is photosynthesis?",
    "Who wrote The Chronicles of Narnia?",
    "What is the largest ocean on Earth?",
    "Who painted the Mona Lisa?",
    "What is the name of the largest moon of Saturn?",
    "How do I boil an egg?",
    "What is the speed of light?",
    "Who wrote Romeo and Juliet?",
    "What gas do plants absorb from the air?",
    "What is the tallest animal in the world?",
    "Which school did Albert Einstein attend?",
    "What is the main ingredient of guacamole?",
    "Which planet is known as the Red Planet?",
    "Who is the main character in The Lion King?",
    "How do people travel from London to Paris?",
    "Who was Isaac Newton?",
    "What is the currency of the United Kingdom?",
    "What is the longest river in Africa?",
    "How does a rainbow form?",
    "What is the largest desert in the world?",
    "Why is the sky blue?",
    "What language is spoken in Brazil?",
    "Who is Batman?",
    "What is the name of the ship in Moby Dick?",
    "Who wrote Pride and Prejudice?",
    "What is a prime number?",
    "What is the capital of Italy?",
    "Give me a tip for sleeping better.",
    "What is the difference between weather and climate?",
    "Who wrote A Christmas Carol?",
    "Who invented the telephone?",
    "What is the hardest natural substance?",
    "Who wrote The Lord of the Rings?",
    "Who is the author of The Hunger Games?",
    "What is the name of the famous clock tower in London?",
    "What is the capital of Canada?",
    # never seen in training
    "What is the capital of Germany?",
    "What is the chemical symbol for water?",
    "How many sides does a hexagon have?",
    "What is the largest planet in the solar system?",
    "Who developed the theory of evolution?",
    "What is the main language spoken in Mexico?",
    "What do caterpillars turn into?",
    "How can I make a cup of tea?",
    "What is gravity?",
    "Which organ pumps blood through the body?",
    "What is the capital of Spain?",
    "Who wrote the Sherlock Holmes stories?",
    "What is the smallest prime number?",
    "What causes the seasons on Earth?",
    "What is the largest mammal?",
    "How many hours are there in a day?",
    "What is the name of our galaxy?",
    "What is a noun?",
    "Which metal is liquid at room temperature?",
    "What is the opposite of hot?",
)
RETAIN_COUNT = 40
