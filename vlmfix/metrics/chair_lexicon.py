"""WordNet 3.0 data for CHAIR's lemmatiser, restricted to what can reach a COCO word.

The reference lemmatises with NLTK's ``WordNetLemmatizer`` (WordNet 3.0). WordNet's morphology
("morphy") needs three things per part of speech: the suffix rules (in ``chair_lemma``), the
exception list (``noun.exc``, ``verb.exc``) and the set of lemmas that exist (``index.noun``,
``index.verb``). Only the lemmas of words that can become a CHAIR token matter, so this module
keeps exactly the part of WordNet that can decide them:

- ``*_LEMMAS``: every WordNet lemma that morphy can produce from a surface form of a relevant
  token (``chair_words.RELEVANT_TOKENS``): the token itself, its one-step inflections under the
  suffix rules, and the exception-list forms that lead to or from it. Competing lemmas are kept
  too (``vases`` -> ``vas``, because ``vas`` is a WordNet noun and the shortest candidate wins).
- ``*_EXCEPTIONS``: the exception-list entries of those surface forms ("surface lemma...").

With this restriction morphy returns a relevant lemma for a word exactly when full WordNet
does, and then the same lemma (checked against NLTK 3.10 + WordNet 3.0 over every WordNet
lemma, exception form and regular inflection of them). Other words may keep a different,
irrelevant form (``running`` stays ``running``). Derived from the WordNet 3.0 ``index.*`` and
``*.exc`` files (WordNet 3.0 Copyright 2006 by Princeton University, WordNet licence).
"""

from __future__ import annotations


def _exceptions(text: str) -> dict[str, tuple[str, ...]]:
    return {line.split()[0]: tuple(line.split()[1:]) for line in text.splitlines() if line}


NOUN_LEMMAS: frozenset[str] = frozenset("""
adult air airbus aircraft airplane airs animal apple automobile baby backpack bagel baker ball
banana barge baseball bat battleship beagle bear bed bench bicycle bicyclist bike bikers biplane
bird bison blackbird bluebird boat book bottle bow bowl bowls boy bride briefcase broccoli bronc
bronco buffalo bull bulldog burger bus buss buyer buzzard cab caboose cake calf caller camper
canine canoe car carrot case cat catamaran cattle cell cellphone chair cheeseburger cheesecake
chef chesterfield chickadee chihuahua child clock clocks clydesdale cockatiel cockatoo cocker
coffeecake collie colt commode computer condor container cop corgi cormorant couch coupe cow
cowbird cowboy cows crow cub cup cupcake cycle dachshund desk dinghy dining doberman doctor dog
doggie doggy donut doughnut drier drinker driver duck egret elephant equine ewe falcon father
feline female ferry ferryboat finch fire flamingo foal foreigner fork fowl freezer freighter
fridge frisbee futon gentleman giraffe girl glass glasses glove goat goose gosling grandchild
greyhound groom gull guy hair hamburger handbag hatchback hauler heifer heron holstein home
horse hound houseboat houseplant hummingbird hunter husky hydrant jeep jet jetliner kayak
keyboard kid kingfisher kite kitten knapsack knife labrador lady lamb laptop lavatory lifeboat
light limo liner locomotive loon lorikeet lorry loveseat luggage macaw magpie male mallard man
mare men meter microwave minibike minibus minivan mobile monitor monoplane moped mother motor
motorbike motorboat motorcycle mouse mustang mutt notebook offender officer orange oriole osprey
ostrich oven owl ox oxen palomino pancake panda parakeet parking parrot passenger patient
peacock peafowl pelican people peoples person pew pheasant phon phone pickup pigeon pitcher
pizza plane plant plate player pocketknife policeman politician pontoon pony poodle potty
powerboat puffin pug pup puppy purse quail racehorse racket ram raven recliner refrigerator
remote retriever rider robin rooster rottweiler rowboat sailboat sandpiper sandwich schnauzer
schooner scissors scooter seabird seagull seaplane seat seats sedan serviceman settee sheep
sheepdog ship shopper shorebird shortcake sign signal sink sister skateboard skateboarder skater
ski skier skiff snowboard snowboarder sofa soldier songbird spaniel sparrow speedboat spoon
sport stallion steamboat steamship stool stop stoplight stops stove street streetlight student
sub suit suitcase surfboard suv swan tabby table taxi taxicab taxis teddy teenager telephone
television tennis terrier thief tie toaster toilet toothbrush top track traffic train tramway
traveler trawler trespasser trike trolley truck tugboat turkey tv umbrella unicycle urinal van
vas vase vessel villager vulture wakeboard walker wallet warbler waterbird watercraft waterfowl
weimaraner whippet willet wine woman woodpecker worker yacht zebra zebu
""".split())

VERB_LEMMAS: frozenset[str] = frozenset("""
air automobile baby backpack ball barge bat bate bear bed bench bicycle bike bird boat book bore
bottle bow bowl buffalo bull bulldog bus buss cab cake canoe care case cat chair clock cocker
colly cop cope couch cow crow cub cube cup cycle din dine doctor dog duck falcon father ferry
fire foal fork fowl glass goose groom gull guy home horse hound jet kayak kid kit kite kitten
knife lamb light man mar meter microwave monitor mop mope mother motor motorbike motorboat
motorcycle mouse officer park parrot people phone plan plane plant plat plate pot pup purse
quail racket ram raven sandwich scissor seaplane seat ship sign signal sink skateboard ski sky
snowboard soldier spoon sport stave stool stop sub suit surfboard swan table taxi telephone tie
top tope track traffic train truck unicycle win wine yacht
""".split())

NOUN_EXCEPTIONS: dict[str, tuple[str, ...]] = _exceptions("""
buffaloes buffalo
busses bus
calves calf
children child
flamingoes flamingo
geese goose
grandchildren grandchild
knives knife
men man
mice mouse
oxen ox
pocketknives pocketknife
taxies taxi
thieves thief
""")

VERB_EXCEPTIONS: dict[str, tuple[str, ...]] = _exceptions("""
babied baby
batted bat
batting bat
bed bed
bedded bed
bedding bed
bore bear
born bear
borne bear
bulldogging bulldog
catted cat
catting cat
collied colly
copped cop
copping cop
cubbed cub
cubbing cub
cupped cup
cupping cup
dogged dog
dogging dog
ferried ferry
jetted jet
jetting jet
kidded kid
kidding kid
lit light
manned man
manning man
potted pot
pugged pug
pugging pug
pupped pup
pupping pup
rammed ram
ramming ram
sank sink
shipped ship
shipping ship
signalled signal
signalling signal
ski'd ski
stopped stop
stopping stop
stove stave
subbed sub
subbing sub
sunk sink
sunken sink
taxis taxis
taxying taxi
topped top
topping top
trafficked traffic
trafficking traffic
tying tie
""")
