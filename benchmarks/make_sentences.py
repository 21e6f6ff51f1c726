"""Regenerate src/modelpress/zoo/data/sentences.txt, the unlabelled sentence corpus used for
calibration and distillation of sentence encoders. Deterministic: same output every run.

A small template grammar per topic (subjects x predicates x modifiers, descriptions,
questions, negations, reported speech) keeps the sentences on topic and grammatical;
the sentences of data/sts_pairs.tsv are appended.

    python benchmarks/make_sentences.py            # writes the file
    python benchmarks/make_sentences.py --check    # exits 1 if the file is out of date
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "modelpress" / "zoo" / "data"
N_GENERATED = 2400

# topic: (subjects, predicates as (past, base), described nouns, adjectives, modifiers)
TOPICS = {
    "cooking": (
        ["the chef", "my grandmother", "the young cook", "the baker", "the students in the class", "Marco"],
        [("baked fresh bread", "bake fresh bread"), ("burned the onions", "burn the onions"),
         ("made a spicy curry", "make a spicy curry"), ("chopped the vegetables", "chop the vegetables"),
         ("tasted the sauce", "taste the sauce"), ("forgot to add salt", "forget to add salt"),
         ("roasted a chicken", "roast a chicken"), ("cleaned the oven", "clean the oven"),
         ("tried a new recipe", "try a new recipe"), ("served the soup", "serve the soup")],
        ["the soup", "the bread", "the cake", "the kitchen", "the pasta"],
        ["too salty", "still warm", "delicious", "burnt on one side", "ready to serve"],
        ["for dinner", "in the morning", "for the whole family", "before the guests arrived", "on Sunday"]),
    "sports": (
        ["the home team", "the goalkeeper", "our coach", "the young striker", "the players", "Serena"],
        [("won the final", "win the final"), ("scored two goals", "score two goals"),
         ("missed a penalty", "miss a penalty"), ("trained in the rain", "train in the rain"),
         ("broke the world record", "break the world record"), ("lost the match", "lose the match"),
         ("signed a new contract", "sign a new contract"), ("injured a knee", "injure a knee"),
         ("ran ten kilometres", "run ten kilometres"), ("celebrated with the fans", "celebrate with the fans")],
        ["the match", "the stadium", "the race", "the season", "the referee"],
        ["exciting", "full of fans", "very close", "disappointing", "unfair"],
        ["last night", "in the final minute", "after a long season", "at the Olympics", "in front of a huge crowd"]),
    "software": (
        ["the developers", "our team", "the new intern", "the security engineer", "the company", "Priya"],
        [("fixed the login bug", "fix the login bug"), ("released a new version", "release a new version"),
         ("deployed the update", "deploy the update"), ("rewrote the database layer", "rewrite the database layer"),
         ("found a memory leak", "find a memory leak"), ("reviewed the pull request", "review the pull request"),
         ("added unit tests", "add unit tests"), ("broke the build", "break the build"),
         ("moved the servers to the cloud", "move the servers to the cloud"),
         ("compressed the neural network", "compress the neural network")],
        ["the app", "the server", "the website", "the model", "the code"],
        ["slow", "down for maintenance", "much faster now", "hard to read", "full of bugs"],
        ["before the deadline", "on Friday evening", "without any tests", "in production", "after the outage"]),
    "medicine": (
        ["the doctor", "the nurse", "the surgeon", "the patients", "the hospital", "Dr. Okafor"],
        [("prescribed antibiotics", "prescribe antibiotics"), ("took a blood sample", "take a blood sample"),
         ("performed the operation", "perform the operation"), ("checked the x-ray", "check the x-ray"),
         ("recovered from the flu", "recover from the flu"), ("tested the new vaccine", "test the new vaccine"),
         ("measured his blood pressure", "measure his blood pressure"), ("hired more staff", "hire more staff"),
         ("treated a broken arm", "treat a broken arm"), ("waited for the results", "wait for the results")],
        ["the clinic", "the treatment", "the waiting room", "the medicine", "the operation"],
        ["crowded", "successful", "expensive", "very effective", "risky"],
        ["in the emergency room", "during the night shift", "this morning", "after the accident", "twice a day"]),
    "travel": (
        ["the tourists", "my parents", "our guide", "the backpackers", "the pilot", "Lena"],
        [("missed the train", "miss the train"), ("booked a hotel by the sea", "book a hotel by the sea"),
         ("lost the passports", "lose the passports"), ("visited the old castle", "visit the old castle"),
         ("took a boat to the island", "take a boat to the island"),
         ("changed money at the airport", "change money at the airport"),
         ("rented a small car", "rent a small car"),
         ("climbed the hill above the town", "climb the hill above the town"),
         ("packed the suitcases", "pack the suitcases"), ("got lost in the old city", "get lost in the old city")],
        ["the flight", "the hotel", "the beach", "the museum", "the trip"],
        ["delayed", "fully booked", "crowded with tourists", "worth the money", "unforgettable"],
        ["in the summer", "on the first day", "before sunrise", "during the holidays", "in Lisbon"]),
    "weather": (
        ["the storm", "the wind", "the heavy rain", "the snow", "the heat wave", "the fog"],
        [("closed the airport", "close the airport"), ("flooded the streets", "flood the streets"),
         ("knocked down several trees", "knock down several trees"),
         ("blocked the mountain roads", "block the mountain roads"),
         ("damaged the harvest", "damage the harvest"), ("cut the power", "cut the power"),
         ("delayed the trains", "delay the trains"), ("kept everyone indoors", "keep everyone indoors")],
        ["the sky", "the river", "the forecast", "the lake", "the air"],
        ["grey", "frozen", "calm", "very humid", "clear and blue"],
        ["overnight", "for three days", "along the coast", "in the north", "this weekend"]),
    "economy": (
        ["the central bank", "the investors", "the company", "the government", "small businesses", "the stock market"],
        [("raised interest rates", "raise interest rates"), ("cut hundreds of jobs", "cut hundreds of jobs"),
         ("reported record profits", "report record profits"), ("lowered prices", "lower prices"),
         ("borrowed more money", "borrow more money"), ("invested in solar energy", "invest in solar energy"),
         ("fell sharply", "fall sharply"), ("recovered the losses", "recover the losses"),
         ("opened a new factory", "open a new factory"), ("paid higher taxes", "pay higher taxes")],
        ["inflation", "the economy", "the housing market", "the budget", "unemployment"],
        ["rising", "stable", "under pressure", "lower than expected", "a major concern"],
        ["this quarter", "last year", "despite the crisis", "in Europe", "for the first time in a decade"]),
    "education": (
        ["the teacher", "the students", "the professor", "my little brother", "the school", "the university"],
        [("passed the exam", "pass the exam"), ("explained the theorem", "explain the theorem"),
         ("wrote an essay about history", "write an essay about history"),
         ("graded the homework", "grade the homework"),
         ("started a chemistry course", "start a chemistry course"), ("read the whole novel", "read the whole novel"),
         ("failed the maths test", "fail the maths test"), ("built a robot", "build a robot"),
         ("hired new teachers", "hire new teachers"), ("studied late in the library", "study late in the library")],
        ["the lecture", "the exam", "the classroom", "the homework", "the library"],
        ["boring", "harder than expected", "quiet", "too long", "very useful"],
        ["before the holidays", "every Monday", "in the first semester", "online", "with great patience"]),
    "music": (
        ["the orchestra", "the band", "the singer", "my sister", "the pianist", "the choir"],
        [("played a symphony", "play a symphony"), ("released a new album", "release a new album"),
         ("cancelled the concert", "cancel the concert"), ("practised the violin", "practise the violin"),
         ("wrote a love song", "write a love song"), ("sang in the cathedral", "sing in the cathedral"),
         ("tuned the guitar", "tune the guitar"), ("toured across Europe", "tour across Europe")],
        ["the concert", "the song", "the album", "the melody", "the festival"],
        ["beautiful", "too loud", "sold out", "very sad", "catchy"],
        ["last night", "for the first time", "in the old theatre", "without a rehearsal", "on the radio"]),
    "art": (
        ["the painter", "the museum", "the photographer", "the art students", "the gallery", "the sculptor"],
        [("painted a portrait", "paint a portrait"), ("opened a new exhibition", "open a new exhibition"),
         ("sold a famous painting", "sell a famous painting"), ("restored the old fresco", "restore the old fresco"),
         ("took pictures of the city", "take pictures of the city"),
         ("carved a statue from marble", "carve a statue from marble")],
        ["the painting", "the exhibition", "the sculpture", "the photograph", "the gallery"],
        ["colourful", "strange", "very old", "priceless", "impressive"],
        ["in Paris", "for the whole summer", "with bright colours", "after years of work", "this spring"]),
    "politics": (
        ["the president", "the parliament", "the mayor", "the opposition", "the minister", "the voters"],
        [("passed a new law", "pass a new law"), ("gave a speech about the economy", "give a speech about the economy"),
         ("rejected the proposal", "reject the proposal"), ("announced new elections", "announce new elections"),
         ("signed a trade agreement", "sign a trade agreement"), ("criticised the budget", "criticise the budget"),
         ("visited the flooded region", "visit the flooded region"), ("resigned", "resign")],
        ["the election", "the debate", "the new law", "the campaign", "the reform"],
        ["controversial", "very close", "popular", "long overdue", "unfair to farmers"],
        ["on Tuesday", "after a long debate", "in the capital", "before the summit", "by a narrow margin"]),
    "science": (
        ["the researchers", "the astronomers", "the biologist", "the lab", "the physicists", "the team in Geneva"],
        [("discovered a new species", "discover a new species"),
         ("observed a distant galaxy", "observe a distant galaxy"),
         ("published their results", "publish their results"), ("repeated the experiment", "repeat the experiment"),
         ("measured the temperature of the ocean", "measure the temperature of the ocean"),
         ("launched a satellite", "launch a satellite"), ("sequenced the genome", "sequence the genome"),
         ("built a new telescope", "build a new telescope")],
        ["the experiment", "the theory", "the data", "the telescope", "the discovery"],
        ["surprising", "hard to explain", "very precise", "controversial", "important"],
        ["last month", "after ten years of work", "in the Antarctic", "with a small budget", "for the first time"]),
    "animals": (
        ["the dog", "the cat", "the horse", "the birds", "the old lion", "the puppy"],
        [("chased a squirrel", "chase a squirrel"), ("slept in the sun", "sleep in the sun"),
         ("jumped over the fence", "jump over the fence"), ("ate all the food", "eat all the food"),
         ("barked at the mailman", "bark at the mailman"), ("ran away", "run away"),
         ("caught a mouse", "catch a mouse"), ("played with a ball", "play with a ball")],
        ["the kitten", "the zoo", "the farm", "the nest", "the aquarium"],
        ["tiny", "noisy", "full of animals", "very friendly", "asleep"],
        ["in the garden", "all afternoon", "near the river", "at the farm", "in the morning"]),
    "home": (
        ["my father", "the neighbours", "the children", "my roommate", "we", "the landlord"],
        [("painted the kitchen", "paint the kitchen"), ("fixed the leaking tap", "fix the leaking tap"),
         ("moved to a bigger flat", "move to a bigger flat"), ("cleaned the windows", "clean the windows"),
         ("planted roses in the garden", "plant roses in the garden"), ("bought a new sofa", "buy a new sofa"),
         ("lost the house keys", "lose the house keys"), ("had a party", "have a party")],
        ["the house", "the garden", "the heating", "the living room", "the rent"],
        ["cold", "too expensive", "broken again", "very cosy", "a mess"],
        ["on Saturday", "before winter", "after work", "for the first time", "last weekend"]),
    "transport": (
        ["the bus driver", "the city council", "the commuters", "the train", "the taxi driver", "the cyclists"],
        [("took a different route", "take a different route"), ("arrived on time", "arrive on time"),
         ("built a new bike lane", "build a new bike lane"), ("closed the main bridge", "close the main bridge"),
         ("waited at the station", "wait at the station"), ("raised ticket prices", "raise ticket prices"),
         ("got stuck in traffic", "get stuck in traffic"), ("repaired the tram line", "repair the tram line")],
        ["the traffic", "the subway", "the road", "the car park", "the bridge"],
        ["terrible", "closed for repairs", "almost empty", "dangerous at night", "new"],
        ["during rush hour", "in the city centre", "every morning", "because of the strike", "after the accident"]),
    "shopping": (
        ["my mother", "the customers", "the shop", "the online store", "the supermarket", "Tom"],
        [("bought new shoes", "buy new shoes"), ("returned a broken phone", "return a broken phone"),
         ("paid with cash", "pay with cash"), ("lowered prices", "lower prices"),
         ("ran out of bread", "run out of bread"), ("ordered a laptop online", "order a laptop online"),
         ("compared prices", "compare prices"), ("waited in a long queue", "wait in a long queue")],
        ["the market", "the new jacket", "the delivery", "the sale", "the receipt"],
        ["cheap", "late", "crowded", "a bargain", "too small"],
        ["on Black Friday", "at the weekend", "before Christmas", "in the morning", "at the mall"]),
    "farming": (
        ["the farmer", "the villagers", "the workers", "the cooperative", "my uncle", "the young farmers"],
        [("planted corn", "plant corn"), ("harvested the wheat", "harvest the wheat"),
         ("milked the cows", "milk the cows"), ("sold apples at the market", "sell apples at the market"),
         ("repaired the tractor", "repair the tractor"), ("watered the fields", "water the fields")],
        ["the harvest", "the soil", "the orchard", "the barn", "the crop"],
        ["dry", "good this year", "ruined by hail", "very fertile", "ready"],
        ["in the spring", "at dawn", "before the rain", "every autumn", "by hand"]),
    "law": (
        ["the police", "the judge", "the lawyers", "the jury", "the court", "the detective"],
        [("arrested two suspects", "arrest two suspects"), ("closed the case", "close the case"),
         ("found new evidence", "find new evidence"), ("delivered the verdict", "deliver the verdict"),
         ("questioned the witness", "question the witness"), ("appealed the decision", "appeal the decision")],
        ["the trial", "the verdict", "the investigation", "the contract", "the evidence"],
        ["fair", "delayed", "very long", "unclear", "convincing"],
        ["on Monday", "after the robbery", "in the high court", "behind closed doors", "last year"]),
    "work": (
        ["my boss", "the manager", "my colleagues", "the new employee", "the committee", "Anna"],
        [("cancelled the meeting", "cancel the meeting"), ("finished the report", "finish the report"),
         ("asked for a raise", "ask for a raise"), ("worked from home", "work from home"),
         ("hired a new assistant", "hire a new assistant"), ("approved the budget", "approve the budget"),
         ("missed the deadline", "miss the deadline"), ("answered all the emails", "answer all the emails")],
        ["the office", "the meeting", "the project", "the deadline", "the presentation"],
        ["stressful", "too long", "a success", "behind schedule", "well organised"],
        ["on Friday", "before lunch", "for the third time", "without complaining", "this week"]),
    "fitness": (
        ["my friend", "the runners", "the old man", "the swimmers", "the trainer", "she"],
        [("ran a marathon", "run a marathon"), ("lifted heavy weights", "lift heavy weights"),
         ("swam forty lengths", "swim forty lengths"), ("went to the gym", "go to the gym"),
         ("stopped eating sugar", "stop eating sugar"), ("did yoga", "do yoga"),
         ("walked ten thousand steps", "walk ten thousand steps"), ("slept eight hours", "sleep eight hours")],
        ["the gym", "the workout", "the pool", "the diet", "the training plan"],
        ["exhausting", "crowded", "healthy", "hard to follow", "relaxing"],
        ["every morning", "three times a week", "after work", "in the park", "despite the cold"]),
}

TEMPLATES = [
    "{S} {past} {M}.", "{S} {past}.", "{S} will {base} {M}.", "{S} did not {base}.",
    "{S} decided to {base}.", "{S} had to {base} {M}.", "{S} might {base} {M}.",
    "Did {s} {base} {M}?", "I heard that {s} {past}.", "According to the news, {s} {past} {M}.",
    "{N} was {A}.", "{N} was {A} {M}.", "I think {n} is {A}.", "{N} was not {A} at all.",
    "Everyone said that {n} was {A}.", "Is {n} still {A}?",
]
# templates that need a subject able to decide or be obliged (not "the storm")
AGENT_TEMPLATES = {"{S} decided to {base}.", "{S} had to {base} {M}."}
NO_AGENT_TOPICS = {"weather"}


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def generate(n: int, seed: int = 0) -> list[str]:
    """``n`` unique sentences, cycling through the topics so each gets an equal share."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    seen, out = set(), []
    while len(out) < n:
        topic = topics[len(out) % len(topics)]
        subjects, predicates, nouns, adjectives, modifiers = TOPICS[topic]
        template = rng.choice(TEMPLATES)
        if topic in NO_AGENT_TOPICS and template in AGENT_TEMPLATES:
            continue
        s, (past, base) = rng.choice(subjects), rng.choice(predicates)
        noun, adj, mod = rng.choice(nouns), rng.choice(adjectives), rng.choice(modifiers)
        sentence = template.format(S=cap(s), s=s, past=past, base=base, N=cap(noun), n=noun,
                                   A=adj, M=mod)
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out


def build() -> str:
    sentences = generate(N_GENERATED)
    seen = set(sentences)
    for line in (DATA / "sts_pairs.tsv").read_text(encoding="utf-8").splitlines():
        for s in line.split("\t")[1:]:
            if s and s not in seen:
                seen.add(s)
                sentences.append(s)
    return "\n".join(sentences) + "\n"


if __name__ == "__main__":
    text, target = build(), DATA / "sentences.txt"
    if "--check" in sys.argv:
        sys.exit(0 if target.exists() and target.read_text(encoding="utf-8") == text else 1)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} sentences to {target}")
