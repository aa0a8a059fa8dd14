"""The word tables of CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning",
EMNLP 2018).

Transcribed from the reference evaluation code's tables, quirks included, so that numbers stay comparable with the
published tables:

- ``SYNONYMS``: one line per COCO object, node word first, entries split on ", " exactly as the
  reference does. Two entries therefore carry a leading space (" motor bike", " cheesecake") and
  can never match a token; "iPhone" is mixed-case and never matches lower-cased text.
- ``DOUBLE_WORDS``: two-token phrases merged before the synonym look-up ("hot dog" is one word,
  so a hot dog is not a dog), with the baby/adult animal, passenger jet/train and the three
  overrides ("bow tie" -> tie, "toilet seat" -> toilet, "wine glas" -> wine glass).
"""

from __future__ import annotations

SYNONYMS_TEXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, foreigner, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
zebra
giraffe
bear, panda
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
snowboard
kite
baseball bat
baseball glove
skateboard
skis, ski
sports ball, ball
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
spoon
banana
apple
orange
broccoli
carrot
hot dog
pizza
knife, pocketknife, knive
bowl, container
sandwich, burger, sub, cheeseburger, hamburger
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
microwave
toaster
sink
book
clock
vase
scissors
toothbrush
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
oven, stovetop, stove, stove top oven
refrigerator, fridge, freezer
teddy bear, teddybear
hair drier, hairdryer
"""


def _synonym_lines() -> list[list[str]]:
    return [line.split(", ") for line in SYNONYMS_TEXT.splitlines() if line]


#: word (as it must appear after lemmatisation and phrase merging) -> COCO node word.
#: A word listed on two lines would map to the later line's node word, as in the reference
#: (no word is listed on two lines).
INVERSE_SYNONYMS: dict[str, str] = {
    word: line[0] for line in _synonym_lines() for word in line
}

#: The COCO node words (the 80 object names of the synonym table), in table order.
NODE_WORDS: tuple[str, ...] = tuple(line[0] for line in _synonym_lines())

_SELF_MAPPED_PHRASES = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
            "animal", "cub")
_VEHICLES = ("jet", "train")


def _double_words() -> dict[str, str]:
    table = {phrase: phrase for phrase in _SELF_MAPPED_PHRASES}
    for animal in _ANIMALS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"
    return table


#: "first second" (lemmas) -> the single word emitted in their place. "stove top oven" has three
#: tokens and so never matches a two-token window; it is kept because the reference keeps it.
DOUBLE_WORDS: dict[str, str] = _double_words()

#: Every single token that can matter to CHAIR: the one-word synonym entries and the halves of
#: the double words. The lemmatiser must be exact for these and only these.
RELEVANT_TOKENS: frozenset[str] = frozenset(
    token
    for text in (*INVERSE_SYNONYMS, *DOUBLE_WORDS)
    for token in text.split(" ")
    if token
)
