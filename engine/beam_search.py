"""Beam search on top of the engine, as vLLM's LLM.beam_search does it.

Every step sends each live beam to the engine as a request whose prompt is prompt + beam
tokens, with max_tokens=1 and logprobs=2*beam_width: the engine returns the top candidates for
the next token. Beams of one prompt share their prompt's KV blocks through the prefix cache
(the blocks of a finished one-token request stay cached), so a step only computes each beam's
last, uncached block instead of copying the prompt. Models with a recurrent state (Mamba) do
the same through state snapshots: a finished step request's state covers exactly its prompt,
so the next step's beam starts from a copy of it and computes only its newest token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from .outputs import Logprob
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .llm import LLM


@dataclass
class BeamSearchParams:
    """beam_width beams kept per step, for at most max_tokens new tokens. temperature > 0
    samples which candidate tokens are proposed (their scores stay the raw logprobs)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    """One beam. `tokens` includes the prompt (as in vLLM); `logprobs` has one entry per
    generated token (the candidates the engine returned at that step); `text` is the decoded
    generated part, filled in when the beam is returned."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    """The best beam_width sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def get_beam_search_score(tokens: list[int], cum_logprob: float, eos_token_ids: Sequence[int],
                          length_penalty: float = 1.0) -> float:
    """cum_logprob / len ** length_penalty, where len counts the prompt but not a final EOS
    (vLLM's score, after transformers')."""
    seq_len = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (seq_len ** length_penalty)


class _Instance:
    def __init__(self, prompt_token_ids: list[int]) -> None:
        n = len(prompt_token_ids)
        self.beams = [BeamSearchSequence(list(prompt_token_ids), num_prompt_tokens=n)]
        self.completed: list[BeamSearchSequence] = []


def beam_search(llm: "LLM", prompts: Any, params: BeamSearchParams,
                use_tqdm: bool = False) -> list[BeamSearchOutput]:
    if not isinstance(params, BeamSearchParams):
        raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine = llm.llm_engine
    instances = [_Instance(ids) for ids in _tokenize_all(engine, prompts)]
    # With ignore_eos an EOS is an ordinary token: it neither ends a beam nor its length.
    eos = () if params.ignore_eos else engine.eos_token_ids
    key = _sort_key(eos, params.length_penalty)
    step_params = SamplingParams(max_tokens=1, temperature=params.temperature,
                                 logprobs=min(2 * params.beam_width, engine.vocab_size),
                                 detokenize=False)
    for _ in range(params.max_tokens):
        live = [(inst, beam) for inst in instances for beam in inst.beams]
        if not live:
            break
        outputs = llm.generate([{"prompt_token_ids": beam.tokens} for _, beam in live],
                               step_params, use_tqdm=use_tqdm)
        candidates: dict[int, list[BeamSearchSequence]] = {id(i): [] for i in instances}
        for (inst, beam), out in zip(live, outputs):
            step_logprobs = out.outputs[0].logprobs[0]
            for token, lp in step_logprobs.items():
                child = BeamSearchSequence(beam.tokens + [token], beam.logprobs + [step_logprobs],
                                           beam.cum_logprob + lp.logprob,
                                           num_prompt_tokens=beam.num_prompt_tokens)
                if token in eos:
                    child.finish_reason = "stop"
                    inst.completed.append(child)
                else:
                    candidates[id(inst)].append(child)
        for inst in instances:
            kept = sorted(candidates[id(inst)], key=key, reverse=True)[:params.beam_width]
            inst.beams = _retire_full(kept, inst, engine.config.max_model_len)
    return [_finish(inst, params, key, engine.tokenizer) for inst in instances]


def _tokenize_all(engine: Any, prompts: Any) -> list[list[int]]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    result = []
    greedy = SamplingParams(max_tokens=1)
    for i, prompt in enumerate(prompts):
        try:
            _, ids = engine.tokenize_prompt(prompt)
            engine.validate(ids, greedy)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from e
        result.append(ids)
    return result


def _retire_full(beams: list[BeamSearchSequence], inst: _Instance,
                 max_model_len: int) -> list[BeamSearchSequence]:
    """Beams that filled the context window cannot grow: they are complete ("length")."""
    live = []
    for beam in beams:
        if len(beam.tokens) >= max_model_len:
            beam.finish_reason = "length"
            inst.completed.append(beam)
        else:
            live.append(beam)
    return live


def _sort_key(eos_token_ids: Sequence[int], length_penalty: float):
    def key(beam: BeamSearchSequence) -> float:
        return get_beam_search_score(beam.tokens, beam.cum_logprob, eos_token_ids,
                                     length_penalty)
    return key


def _finish(inst: _Instance, params: BeamSearchParams, key, tokenizer: Any) -> BeamSearchOutput:
    for beam in inst.beams:                  # still running after max_tokens steps
        beam.finish_reason = "length"
    best = sorted(inst.completed + inst.beams, key=key, reverse=True)[:params.beam_width]
    for beam in best:
        out = beam.output_token_ids
        if beam.finish_reason != "stop":
            beam.text = tokenizer.decode(out, skip_special_tokens=True)
            continue
        beam.text = tokenizer.decode(out[:-1], skip_special_tokens=True)
        if params.include_stop_str_in_output:    # the EOS text is kept only when asked for
            beam.text += tokenizer.decode(out[-1:], skip_special_tokens=False)
    return BeamSearchOutput(sequences=best)
