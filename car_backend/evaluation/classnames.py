"""Class-name strings: the queries CaR is given (the paper's strings) and the plain names we print.

The query strings are the ones the official code evaluates with (GR: clip_as_rnn/data/voc.py, coco.py,
context.py; spec section 3). They differ from the datasets' own names on purpose ("bird avian",
"tvmonitor screen", "sknowboard" (sic), ...), so changing them changes the numbers.
"""

from __future__ import annotations

BACKGROUND = "background"

# Pascal VOC 2012: label k (1..20) is VOC_QUERIES[k - 1].
VOC_QUERIES = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor screen",
)
VOC_LABELS = (
    BACKGROUND, "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# COCO-Object: label k (1..80) is the k-th COCO thing category in category-id order.
# The official list (GR: data/coco.py) applies the VOC edits to the shared classes (person, bird, chair, ...)
# plus the ones the spec names ('backpack,bag', 'sknowboard', 'dessertspoon', 'hairdrier,blowdrier', ...).
COCO_OBJECT_QUERIES = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird avian", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack,bag", "umbrella,parasol",
    "handbag,purse", "necktie", "suitcase", "frisbee", "skis", "sknowboard", "sports ball", "kite",
    "baseball bat", "glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "dessertspoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor screen", "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)
COCO_OBJECT_LABELS = (
    BACKGROUND, "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# Pascal Context 59 in mmseg's label order: label k (1..59) is CONTEXT_QUERIES[k - 1].
CONTEXT_QUERIES = (
    "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves", "sidewalk",
    "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall", "water",
    "window", "wood",
)
CONTEXT_LABELS = (
    BACKGROUND, "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep",
    "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor",
    "wall", "water", "window", "wood",
)
# The official Context evaluation runs the 21 stuff classes and the 38 things as two separate passes.
CONTEXT_STUFF_QUERIES = (
    "bedclothes", "ceiling", "cloth", "curtain", "floor", "grass", "ground", "light", "mountain", "platform",
    "road", "sidewalk", "sky", "snow", "wall", "water", "window", "wood", "door", "fence", "rock",
)
CONTEXT_THING_QUERIES = tuple(q for q in CONTEXT_QUERIES if q not in CONTEXT_STUFF_QUERIES)
