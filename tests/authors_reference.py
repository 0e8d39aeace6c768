"""The paper authors' vote, transcribed as an independent reference for the tests.

Source: google-deepmind/visual-memory, ``code/main_analysis_plots.ipynb``,
cells 53-57 (``PredictionAggregation.predict``, ``PluralityVoting``,
``DistanceWeightedVoting``, ``RankWeightedVoting``, ``SoftmaxWeightedVoting``)
and 88-89 (``SoftPluralityVoting``, ``SoftRankVoting``). The class bodies are
the notebook's, verbatim (2-space indentation included; docstrings shortened);
plain Python loops over one neighbour list, sharing nothing with
`visual_memory.vote`. `authors_prediction_at_k` is the call their
``get_acc`` / ``plot_neighbor_scaling`` make for one query.
"""

from __future__ import annotations

import math

import numpy as np

# fmt: off
class PredictionAggregation():
  """Abstract base class for aggregating predictions from nearest neighbors."""

  def __init__(self):
    self.exclude_sets = dict()
    self.hyperparam = None

  def index_to_weight(self, index: int, *args, **kwargs) -> float:
    raise NotImplementedError()

  def add_exclude_sets(self, exclude_sets):
    self.exclude_sets = exclude_sets

  def predict(self,
              predictions: list,
              neighbor_image_ids: list,
              featurizer: str,
              *args, **kwargs) -> list[str]:

    predictions_at_k = []
    counts = {}
    max_count = -np.inf
    highest_weight_class = None
    i_count = 0

    # In case add_exclude_sets() was called, exclude 'bad' neighbors
    exclude_neighbors = featurizer in self.exclude_sets.keys()
    exclude_set = set()
    if exclude_neighbors:
      exclude_set = self.exclude_sets[featurizer]
      num_intersecting_bad_neighbors = len(set(neighbor_image_ids).intersection(exclude_set))

      # If there's no good neighbor, proceed as usual without excluding any.
      # Note that this determination is done based on all neighbors,
      # not just on the information for k=1 etc.
      if len(neighbor_image_ids) - num_intersecting_bad_neighbors <= 0:
        exclude_neighbors = False

    for i, p in enumerate(predictions):

      if not (exclude_neighbors and neighbor_image_ids[i] in exclude_set):

        kwargs['neighbor_image_ids'] = neighbor_image_ids
        weight = self.index_to_weight(index=i_count, *args, **kwargs)

        if p in counts:
          counts[p] += weight
        else:
          counts[p] = weight

        if counts[p] > max_count:
          max_count = counts[p]
          highest_weight_class = p

        # Note: index_counter won't be increased in the event of
        # a 'bad neighbor' that needs to be excluded
        i_count += 1

      if not highest_weight_class:
        predictions_at_k.append(predictions[0])
      else:
        predictions_at_k.append(highest_weight_class)

    if len(predictions_at_k) != len(predictions):
      raise ValueError(len(predictions_at_k), len(predictions))

    return predictions_at_k


class PluralityVoting(PredictionAggregation):
  def __init__(self):
    super().__init__()

  def index_to_weight(self, index: int, *args, **kwargs) -> float:
    return 1


class DistanceWeightedVoting(PredictionAggregation):
  def __init__(self, exponent: float = 1.0):
    super().__init__()
    self.exponent = exponent
    self.hyperparam = self.exponent

  def index_to_weight(self, index: int, distances: list, *args, **kwargs) -> float:
    return math.exp(-distances[index])**self.exponent


class RankWeightedVoting(PredictionAggregation):
  def __init__(self, offset: float = 2.0):
    super().__init__()
    assert offset >= 0.1 # avoid division by zero
    self.offset = offset
    self.hyperparam = self.offset

  def index_to_weight(self, index: int, *args, **kwargs) -> float:
    return 1/(index + self.offset)


class SoftmaxWeightedVoting(PredictionAggregation):
  def __init__(self, temperature: float = 0.07):
    super().__init__()
    self.temperature = temperature
    self.hyperparam = self.temperature

  def index_to_weight(self, index: int, distances: list, *args, **kwargs) -> float:
    if len(distances) > 1:
      assert distances[0] <= distances[1], 'Distances must be sorted'

    # this code assumes distances to be normalized to [0, 1]
    assert max(distances) <= 1.01
    assert min(distances) >= -0.01

    # new implementation
    distance = distances[index]
    similarity = 1 - distance
    return np.exp(similarity / self.temperature)


class SoftPluralityVoting(PredictionAggregation):
  def __init__(self, image_id_to_weight: dict[str, float]):
    super().__init__()
    self.image_id_to_weight = image_id_to_weight

  def index_to_weight(self, index: int, neighbor_image_ids, *args, **kwargs) -> float:

    neighbor_img_id = neighbor_image_ids[index]

    if neighbor_img_id in self.image_id_to_weight:
      soft_weight = self.image_id_to_weight[neighbor_img_id]
    else:
      soft_weight = 1.0

    return soft_weight


class SoftRankVoting(PredictionAggregation):
  def __init__(self, image_id_to_weight: dict[str, float], offset: float = 2.0):
    super().__init__()
    assert offset >= 0.1 # avoid division by zero
    self.offset = offset
    self.image_id_to_weight = image_id_to_weight
    self.hyperparam = self.offset

  def index_to_weight(self, index: int, neighbor_image_ids, *args, **kwargs) -> float:

    neighbor_img_id = neighbor_image_ids[index]

    if neighbor_img_id in self.image_id_to_weight:
      soft_weight = self.image_id_to_weight[neighbor_img_id]
    else:
      soft_weight = 1.0

    return (1/(index + self.offset)) * soft_weight


# fmt: on

AUTHORS = {"plurality": PluralityVoting, "distance": DistanceWeightedVoting, "softmax": SoftmaxWeightedVoting,
           "rank": RankWeightedVoting}
FEAT = "dinov2_vitl14"


def authors_prediction_at_k(vote, classes, distances, ids, *, exclude=None, soft=None):
    """The authors' ``prediction_at_k`` for one neighbour list (their ``get_acc`` / ``plot_neighbor_scaling`` call).

    With an exclude set, distance and softmax get each voter's own distance at its
    voter index: their code reads ``distances[i_count]`` from the unfiltered list,
    which gives a voter the distance of whichever neighbour sits at its voter index
    (see `visual_memory.vote`, "Where this departs"). Positions past the voters are
    never read and are padded so the softmax asserts still hold.
    """
    if soft is not None:
        agg = {"plurality": SoftPluralityVoting, "rank": SoftRankVoting}[vote](image_id_to_weight=soft)
    else:
        agg = AUTHORS[vote]()
    distances = list(distances)
    if exclude:
        agg.add_exclude_sets({FEAT: set(exclude)})
        if vote in ("distance", "softmax"):
            voters = [d for d, i in zip(distances, ids) if i not in exclude] or distances
            distances = voters + [voters[-1]] * (len(distances) - len(voters))
    return agg.predict(predictions=list(classes), distances=distances, neighbor_image_ids=list(ids), featurizer=FEAT)


