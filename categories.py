"""Built-in category lists and prompt templates (data, not code).

Every list starts with "background" at index 0: the list index is the label id used in
ground-truth maps and in every prediction. Sources: the official repository's configs/*.yaml
(verbatim) and utils/extract_text_embeddings.py (the 85 templates), NamedMask's VOC2012 names, and the 65/15 COCO seen/unseen split (Rahman et
al. 2020) used for the paper's Table 7.

    get_categories("voc") -> ["background", "aeroplane", ...]
    get_categories("my_names.txt") -> ["background", <one name per line>]
"""
import difflib
import os

from common import UserError

VOC = [
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'dining table', 'dog', 'horse', 'motorbike', 'person', 'potted plant', 'sheep', 'sofa', 'train',
    'tv/monitor',
]

# COCO2017 / COCO-20K things, index = contiguous label id (official config order).
COCO = [
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog',
    'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag',
    'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat',
    'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork',
    'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog',
    'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv',
    'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush',
]

# contiguous id (index) -> original COCO category_id (datasets/coco2017.py in the official repo)
COCO_IDS = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56,
    57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86,
    87, 88, 89, 90,
]

# the 15 unseen classes of the 65/15 zero-shot instance segmentation split (paper Table 7)
COCO_UNSEEN = [
    'airplane', 'train', 'parking meter', 'cat', 'bear', 'suitcase', 'frisbee', 'snowboard', 'fork',
    'sandwich', 'hot dog', 'toilet', 'mouse', 'toaster', 'hair drier',
]

# CoCA folder names (they must match `coca/image/<category>` exactly)
COCA = [
    'background', 'Accordion', 'UAV', 'Yellow duck', 'alarm clock', 'avocado', 'backpack', 'baseball',
    'beer bottle', 'belt', 'binoculars', 'boots', 'butterfly', 'calculator', 'camel', 'camera',
    'candle', 'chopsticks', 'clover', 'dice', 'dolphin', 'doughnut', 'dumbbell', 'eggplant', 'faucet',
    'fishing rod', 'frisbee', 'gift box', 'glasses', 'globe', 'glove', 'guitar', 'hammer', 'hammock',
    'handbag', 'harp', 'hat', 'headphone', 'helicopter', 'high heels', 'hourglass', 'ice cream', 'key',
    'lollipop', 'macaroon', 'microphone', 'minions', 'moon', 'persimmon', 'pigeon', 'pillow',
    'pine cone', 'pineapple', 'pocket watch', 'poker', 'potato', 'pumpkin', 'rabbit', 'rocking horse',
    'roller-skating', 'rolling pin', 'soap bubble', 'squirrel', 'stethoscope', 'sticky note', 'stool',
    'strawberry', 'sunflower', 'tablet', 'teddy bear', 'thermometer', 'tomato', 'towel', 'toy car',
    'typewriter', 'violin', 'waffles', 'watering can', 'watermelon', 'wheelchair', 'whisk',
]

# ImageNet-S919 (index = label id in the R + 256*G ground-truth PNGs)
IMAGENET_S919 = [
    'background', 'tench', 'goldfish', 'great white shark', 'tiger shark', 'hammerhead', 'electric ray',
    'stingray', 'cock', 'hen', 'ostrich', 'brambling', 'goldfinch', 'house finch', 'junco',
    'indigo bunting', 'robin', 'bulbul', 'jay', 'magpie', 'chickadee', 'water ouzel', 'kite',
    'bald eagle', 'vulture', 'great grey owl', 'european fire salamander', 'common newt', 'eft',
    'spotted salamander', 'axolotl', 'bullfrog', 'tree frog', 'tailed frog', 'loggerhead',
    'leatherback turtle', 'mud turtle', 'terrapin', 'box turtle', 'banded gecko', 'common iguana',
    'american chameleon', 'whiptail', 'agama', 'frilled lizard', 'alligator lizard', 'gila monster',
    'green lizard', 'african chameleon', 'komodo dragon', 'african crocodile', 'american alligator',
    'triceratops', 'thunder snake', 'ringneck snake', 'hognose snake', 'green snake', 'king snake',
    'garter snake', 'water snake', 'vine snake', 'night snake', 'boa constrictor', 'rock python',
    'indian cobra', 'green mamba', 'sea snake', 'horned viper', 'diamondback', 'sidewinder',
    'trilobite', 'harvestman', 'scorpion', 'black and gold garden spider', 'barn spider',
    'garden spider', 'black widow', 'tarantula', 'wolf spider', 'tick', 'centipede', 'black grouse',
    'ptarmigan', 'ruffed grouse', 'prairie chicken', 'peacock', 'quail', 'partridge', 'african grey',
    'macaw', 'sulphur-crested cockatoo', 'lorikeet', 'coucal', 'bee eater', 'hornbill', 'hummingbird',
    'jacamar', 'toucan', 'drake', 'red-breasted merganser', 'goose', 'black swan', 'tusker', 'echidna',
    'platypus', 'wallaby', 'koala', 'wombat', 'jellyfish', 'sea anemone', 'brain coral', 'flatworm',
    'nematode', 'conch', 'snail', 'slug', 'sea slug', 'chiton', 'chambered nautilus', 'dungeness crab',
    'rock crab', 'fiddler crab', 'king crab', 'american lobster', 'spiny lobster', 'crayfish',
    'hermit crab', 'isopod', 'white stork', 'black stork', 'spoonbill', 'flamingo', 'little blue heron',
    'american egret', 'bittern', 'crane bird', 'limpkin', 'european gallinule', 'american coot',
    'bustard', 'ruddy turnstone', 'red-backed sandpiper', 'redshank', 'dowitcher', 'oystercatcher',
    'pelican', 'king penguin', 'albatross', 'grey whale', 'killer whale', 'dugong', 'sea lion',
    'chihuahua', 'japanese spaniel', 'maltese dog', 'pekinese', 'shih-tzu', 'blenheim spaniel',
    'papillon', 'toy terrier', 'rhodesian ridgeback', 'afghan hound', 'basset', 'beagle', 'bloodhound',
    'bluetick', 'black-and-tan coonhound', 'walker hound', 'english foxhound', 'redbone', 'borzoi',
    'irish wolfhound', 'italian greyhound', 'whippet', 'ibizan hound', 'norwegian elkhound',
    'otterhound', 'saluki', 'scottish deerhound', 'weimaraner', 'staffordshire bullterrier',
    'american staffordshire terrier', 'bedlington terrier', 'border terrier', 'kerry blue terrier',
    'irish terrier', 'norfolk terrier', 'norwich terrier', 'yorkshire terrier',
    'wire-haired fox terrier', 'lakeland terrier', 'sealyham terrier', 'airedale', 'cairn',
    'australian terrier', 'dandie dinmont', 'boston bull', 'miniature schnauzer', 'giant schnauzer',
    'standard schnauzer', 'scotch terrier', 'tibetan terrier', 'silky terrier',
    'soft-coated wheaten terrier', 'west highland white terrier', 'lhasa', 'flat-coated retriever',
    'curly-coated retriever', 'golden retriever', 'labrador retriever', 'chesapeake bay retriever',
    'german short-haired pointer', 'vizsla', 'english setter', 'irish setter', 'gordon setter',
    'brittany spaniel', 'clumber', 'english springer', 'welsh springer spaniel', 'cocker spaniel',
    'sussex spaniel', 'irish water spaniel', 'kuvasz', 'schipperke', 'groenendael', 'malinois',
    'briard', 'kelpie', 'komondor', 'old english sheepdog', 'shetland sheepdog', 'collie',
    'border collie', 'bouvier des flandres', 'rottweiler', 'german shepherd', 'doberman',
    'miniature pinscher', 'greater swiss mountain dog', 'bernese mountain dog', 'appenzeller',
    'entlebucher', 'boxer', 'bull mastiff', 'tibetan mastiff', 'french bulldog', 'great dane',
    'saint bernard', 'eskimo dog', 'malamute', 'siberian husky', 'dalmatian', 'affenpinscher',
    'basenji', 'pug', 'leonberg', 'newfoundland', 'great pyrenees', 'samoyed', 'pomeranian', 'chow',
    'keeshond', 'brabancon griffon', 'pembroke', 'Cardigan Welsh corgi', 'toy poodle',
    'miniature poodle', 'standard poodle', 'mexican hairless', 'timber wolf', 'white wolf', 'red wolf',
    'coyote', 'dingo', 'dhole', 'african hunting dog', 'hyena', 'red fox', 'kit fox', 'arctic fox',
    'grey fox', 'tabby', 'tiger cat', 'persian cat', 'siamese cat', 'egyptian cat', 'cougar', 'lynx',
    'leopard', 'snow leopard', 'jaguar', 'lion', 'tiger', 'cheetah', 'brown bear',
    'american black bear', 'ice bear', 'sloth bear', 'mongoose', 'meerkat', 'tiger beetle', 'ladybug',
    'ground beetle', 'long-horned beetle', 'leaf beetle', 'dung beetle', 'rhinoceros beetle', 'weevil',
    'fly', 'bee', 'ant', 'grasshopper', 'cricket', 'walking stick', 'cockroach', 'mantis', 'cicada',
    'leafhopper', 'lacewing', 'dragonfly', 'damselfly', 'admiral', 'ringlet', 'monarch',
    'cabbage butterfly', 'sulphur butterfly', 'lycaenid', 'starfish', 'sea urchin', 'sea cucumber',
    'wood rabbit', 'hare', 'angora', 'hamster', 'porcupine', 'fox squirrel', 'marmot', 'beaver',
    'guinea pig', 'sorrel', 'zebra', 'hog', 'wild boar', 'warthog', 'hippopotamus', 'ox',
    'water buffalo', 'bison', 'ram', 'bighorn', 'ibex', 'hartebeest', 'impala', 'gazelle',
    'arabian camel', 'llama', 'weasel', 'mink', 'polecat', 'black-footed ferret', 'otter', 'skunk',
    'badger', 'armadillo', 'three-toed sloth', 'orangutan', 'gorilla', 'chimpanzee', 'gibbon',
    'siamang', 'guenon', 'patas', 'baboon', 'macaque', 'langur', 'colobus', 'proboscis monkey',
    'marmoset', 'capuchin', 'howler monkey', 'titi', 'spider monkey', 'squirrel monkey',
    'madagascar cat', 'indri', 'indian elephant', 'african elephant', 'lesser panda', 'giant panda',
    'barracouta', 'eel', 'coho', 'rock beauty', 'anemone fish', 'sturgeon', 'gar', 'lionfish', 'puffer',
    'abacus', 'abaya', 'academic gown', 'accordion', 'acoustic guitar', 'aircraft carrier', 'airliner',
    'airship', 'ambulance', 'amphibian', 'analog clock', 'apiary', 'apron', 'ashcan', 'assault rifle',
    'backpack', 'balloon', 'ballpoint', 'band aid', 'banjo', 'barbell', 'barber chair', 'barn',
    'barometer', 'barrel', 'barrow', 'baseball', 'basketball', 'bassinet', 'bassoon', 'bath towel',
    'bathtub', 'beach wagon', 'beacon', 'beaker', 'bearskin', 'beer bottle', 'beer glass', 'bib',
    'bicycle-built-for-two', 'binder', 'binoculars', 'birdhouse', 'boathouse', 'bobsled', 'bolo tie',
    'bonnet', 'bookcase', 'bow', 'bow tie', 'brass', 'brassiere', 'breastplate', 'broom', 'bucket',
    'buckle', 'bulletproof vest', 'bullet train', 'cab', 'caldron', 'candle', 'cannon', 'canoe',
    'can opener', 'cardigan sweater', 'car mirror', "carpenter's kit", 'carton', 'cassette',
    'cassette player', 'castle', 'catamaran', 'cello', 'cellular telephone', 'chain', 'chainlink fence',
    'chain saw', 'chest', 'chiffonier', 'chime', 'china cabinet', 'christmas stocking', 'church',
    'cleaver', 'cloak', 'clog', 'cocktail shaker', 'coffee mug', 'coffeepot', 'combination lock',
    'container ship', 'convertible', 'corkscrew', 'cornet', 'cowboy boot', 'cowboy hat', 'cradle',
    'tower crane', 'crash helmet', 'crate', 'crib', 'crock pot', 'croquet ball', 'crutch', 'cuirass',
    'desk', 'dial telephone', 'diaper', 'digital clock', 'digital watch', 'dining table', 'dishrag',
    'dishwasher', 'doormat', 'drilling platform', 'drum', 'drumstick', 'dumbbell', 'dutch oven',
    'electric fan', 'electric guitar', 'electric locomotive', 'envelope', 'espresso maker',
    'face powder', 'feather boa', 'file', 'fireboat', 'fire engine', 'fire screen', 'flagpole', 'flute',
    'folding chair', 'football helmet', 'forklift', 'fountain pen', 'four-poster', 'freight car',
    'french horn', 'frying pan', 'fur coat', 'garbage truck', 'gasmask', 'gas pump', 'goblet',
    'go-kart', 'golf ball', 'golfcart', 'gondola', 'gong', 'gown', 'grand piano', 'guillotine',
    'hair slide', 'hair spray', 'half track', 'hammer', 'hamper', 'hand blower', 'hand-held computer',
    'handkerchief', 'hard disc', 'harmonica', 'harp', 'harvester', 'hatchet', 'holster', 'honeycomb',
    'hook', 'hoopskirt', 'horizontal bar', 'horse cart', 'hourglass', 'ipod', 'iron', "jack-o'-lantern",
    'jean', 'jeep', 'jersey', 'jigsaw puzzle', 'jinrikisha', 'joystick', 'kimono', 'knee pad', 'knot',
    'lab coat', 'ladle', 'lawn mower', 'lens cap', 'letter opener', 'lifeboat', 'lighter', 'limousine',
    'liner', 'lipstick', 'loafer', 'lotion', 'loudspeaker', 'loupe', 'magnetic compass', 'mailbag',
    'mailbox', 'manhole cover', 'maraca', 'marimba', 'mask', 'matchstick', 'maypole', 'measuring cup',
    'medicine chest', 'megalith', 'microphone', 'microwave', 'military uniform', 'milk can', 'minibus',
    'miniskirt', 'minivan', 'missile', 'mitten', 'mixing bowl', 'mobile home', 'model t', 'modem',
    'monastery', 'monitor', 'moped', 'mortar', 'mortarboard', 'mosque', 'mosquito net', 'motor scooter',
    'mountain bike', 'mountain tent', 'mouse', 'mousetrap', 'moving van', 'muzzle', 'nail',
    'neck brace', 'necklace', 'nipple', 'notebook', 'obelisk', 'oboe', 'ocarina', 'odometer',
    'oil filter', 'organ', 'oscilloscope', 'overskirt', 'oxcart', 'oxygen mask', 'paddle',
    'paddlewheel', 'padlock', 'paintbrush', 'pajama', 'palace', 'panpipe', 'parachute', 'parallel bars',
    'park bench', 'parking meter', 'passenger car', 'pay-phone', 'pedestal', 'pencil box',
    'pencil sharpener', 'perfume', 'petri dish', 'photocopier', 'pick', 'pickelhaube', 'picket fence',
    'pickup', 'pier', 'piggy bank', 'pill bottle', 'pillow', 'ping-pong ball', 'pinwheel', 'pirate',
    'pitcher', 'plane', 'planetarium', 'plastic bag', 'plate rack', 'plunger', 'polaroid camera',
    'pole', 'police van', 'poncho', 'pool table', 'pop bottle', 'pot', "potter's wheel", 'power drill',
    'prayer rug', 'printer', 'prison', 'projector', 'puck', 'punching bag', 'purse', 'quill', 'quilt',
    'racer', 'racket', 'radiator', 'radio', 'radio telescope', 'rain barrel', 'recreational vehicle',
    'reel', 'reflex camera', 'refrigerator', 'remote control', 'revolver', 'rifle', 'rocking chair',
    'rubber eraser', 'rugby ball', 'rule', 'running shoe', 'safe', 'safety pin', 'saltshaker', 'sandal',
    'sarong', 'sax', 'scabbard', 'scale', 'school bus', 'schooner', 'scoreboard', 'screw',
    'screwdriver', 'seat belt', 'sewing machine', 'shield', 'shoji', 'shopping basket', 'shopping cart',
    'shovel', 'shower cap', 'shower curtain', 'ski', 'ski mask', 'sleeping bag', 'slide rule', 'slot',
    'snowmobile', 'snowplow', 'soap dispenser', 'soccer ball', 'sock', 'solar dish', 'sombrero',
    'soup bowl', 'space heater', 'space shuttle', 'spatula', 'speedboat', 'spider web', 'spindle',
    'sports car', 'spotlight', 'steam locomotive', 'steel arch bridge', 'steel drum', 'stethoscope',
    'stole', 'stone wall', 'stopwatch', 'stove', 'strainer', 'streetcar', 'stretcher', 'studio couch',
    'stupa', 'submarine', 'suit', 'sundial', 'sunglass', 'suspension bridge', 'swab', 'sweatshirt',
    'swimming trunks', 'swing', 'syringe', 'table lamp', 'tank', 'teapot', 'teddy', 'television',
    'tennis ball', 'thatch', 'theater curtain', 'thimble', 'thresher', 'throne', 'tile roof', 'toaster',
    'toilet seat', 'torch', 'totem pole', 'tow truck', 'tractor', 'trailer truck', 'tray',
    'trench coat', 'tricycle', 'trimaran', 'tripod', 'triumphal arch', 'trolleybus', 'trombone',
    'typewriter keyboard', 'umbrella', 'unicycle', 'upright', 'vacuum', 'vase', 'velvet',
    'vending machine', 'vestment', 'viaduct', 'violin', 'volleyball', 'waffle iron', 'wall clock',
    'wallet', 'wardrobe', 'warplane', 'washbasin', 'washer', 'water bottle', 'water jug', 'water tower',
    'whiskey jug', 'whistle', 'wig', 'window screen', 'window shade', 'windsor tie', 'wine bottle',
    'wok', 'wooden spoon', 'worm fence', 'wreck', 'yawl', 'yurt', 'comic book', 'street sign',
    'traffic light', 'menu', 'plate', 'guacamole', 'consomme', 'trifle', 'ice cream', 'ice lolly',
    'french loaf', 'bagel', 'pretzel', 'cheeseburger', 'hotdog', 'mashed potato', 'head cabbage',
    'broccoli', 'cauliflower', 'zucchini', 'spaghetti squash', 'acorn squash', 'butternut squash',
    'cucumber', 'artichoke', 'bell pepper', 'cardoon', 'mushroom', 'granny smith', 'strawberry',
    'orange', 'lemon', 'fig', 'pineapple', 'banana', 'jackfruit', 'custard apple', 'pomegranate', 'hay',
    'carbonara', 'dough', 'meat loaf', 'pizza', 'potpie', 'burrito', 'cup', 'eggnog', 'bubble', 'cliff',
    'coral reef', 'ballplayer', 'scuba diver', 'rapeseed', 'daisy', "yellow lady's slipper", 'corn',
    'acorn', 'hip', 'buckeye', 'coral fungus', 'agaric', 'gyromitra', 'stinkhorn', 'earthstar',
    'hen-of-the-woods', 'bolete', 'ear', 'toilet tissue',
]

# The 85 prompt templates of the retrieval text ensemble (official utils/extract_text_embeddings.py order)
TEMPLATES = [
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
    'there is a {} in the scene.',
    'there is the {} in the scene.',
    'this is a {} in the scene.',
    'this is the {} in the scene.',
    'this is one {} in the scene.',
]

BUILTIN = {"voc": VOC, "coco": COCO, "coco2017": COCO, "coco20k": COCO, "coca": COCA,
           "imagenet_s919": IMAGENET_S919, "cub": ["background", "bird"],
           "coco_seen65": [c for c in COCO if c not in COCO_UNSEEN]}  # Table 7: archives of the seen classes only


# The official configs' per-benchmark recipe (configs/*.yaml of the official repository): which index
# sets the archive is retrieved from, how long the segmenter trains, and the label id that marks
# "ignore". ImageNet-S919 is the paper's domain-adaptation setting (ImageNet train only, 80k
# iterations); every other list is zero-shot transfer (ImageNet train + PASS, 20k iterations). With
# 920 classes the ignore id cannot be 255, which is a real class there ("pug").
IMAGENET_TRAIN, PASS = "data/ImageNet2012/train", "data/pass/images"
RECIPES = {"imagenet_s919": {"index_dirs": [IMAGENET_TRAIN], "iters": 80000, "ignore_index": 1000}}
DEFAULT_RECIPE = {"index_dirs": [IMAGENET_TRAIN, PASS], "iters": 20000, "ignore_index": 255}


def recipe(cats):
    """The official defaults for a category list (a spec as get_categories takes, or the names), decided
    from its content, so ImageNet-S919 read from a file or an archive gets the same recipe as the
    built-in name: the names as a set, background aside, equal to a recipe's built-in list. Returns
    {"name": the recipe's list name or "zero-shot", "index_dirs", "iters", "ignore_index"}. The ignore
    id of K classes is never a label id (0 .. K-1): 255, else 1000, else K."""
    names = get_categories(cats) if isinstance(cats, str) else list(cats)
    key = {n for n in names if n != "background"}
    name = next((r for r in RECIPES if key == set(BUILTIN[r]) - {"background"}), "zero-shot")
    r = {"name": name, **RECIPES.get(name, DEFAULT_RECIPE)}
    r["index_dirs"], n_ids = list(r["index_dirs"]), len(key) + 1  # label ids 0 .. K-1, background 0
    if n_ids > r["ignore_index"]:
        r["ignore_index"] = 1000 if n_ids <= 1000 else n_ids
    return r


def get_categories(spec):
    """A built-in list name, a text file (one name per line), a comma-separated string, or one name.

    Always returns a new list with "background" first (added if a file/string lacks it).
    Raises UserError with a one-line message for a missing file, an empty list or a duplicate name.
    """
    if isinstance(spec, (list, tuple)):
        names = [str(s).strip() for s in spec if str(s).strip()]
    elif spec in BUILTIN:
        return list(BUILTIN[spec])
    elif os.path.isdir(spec):
        raise UserError(f"category list {spec!r} is a folder: give a text file with one name per line")
    elif os.path.isfile(spec):
        try:  # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of the first name
            with open(spec, encoding="utf-8-sig") as f:
                names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except UnicodeDecodeError:
            raise UserError(f"category file {spec!r} is not UTF-8 text: save it as UTF-8 with one name per "
                            "line") from None
    elif "," in spec:
        parts = spec.split(",")
        parts = parts[:-1] if not parts[-1].strip() else parts  # a trailing comma, as in 'bird,' (see below)
        if not all(s.strip() for s in parts):
            raise UserError(f"category list {spec!r} has a blank name: separate names with single commas, "
                            "as in 'cat,dog'")
        names = [s.strip() for s in parts]
    elif spec.endswith(".txt") or os.sep in spec:
        raise UserError(f"category file not found: {spec!r}")
    elif difflib.get_close_matches(spec, BUILTIN, n=1, cutoff=0.8):
        close = difflib.get_close_matches(spec, BUILTIN, n=1, cutoff=0.8)[0]  # a typo of a list name
        raise UserError(f"unknown category list {spec!r}: did you mean {close!r}? (for a class of that "
                        f"name write {spec + ','!r}); lists: {sorted(BUILTIN)}")
    else:
        names = [spec.strip()] if spec.strip() else []  # one class name, e.g. --classes bird
    if names and all(n == "background" for n in names):
        raise UserError(f"category list {spec!r} names only 'background', which every list has at label 0: add the "
                        "names of the things to find")
    names = [n for n in names if n != "background"]
    if not names:
        raise UserError(f"category list {spec!r} is empty: give names ('cat,dog'), a text file with one name "
                        f"per line, or a list name ({', '.join(sorted(BUILTIN))})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"category list {spec!r} names {', '.join(map(repr, dup))} more than once")
    return ["background"] + names


if __name__ == "__main__":
    import common
    common.library_main(__doc__, "the --categories and --classes flags of build_archive.py, train.py and "
                                 "evaluate.py read their names through it.")
