"""The per-step cadence against a plain per-condition reference, over every step of several runs."""
import itertools

from megacrystal.train.cadence import Actions, Cadence

ENDS = frozenset({5, 12, 20})  # three phases: steps 1-5, 6-12, 13-20


def _reference(step, total, ends, log, ev, evaluates, ckpt, ckpt_phase_end, max_steps, stop):
    """The conditions as the loop wrote them before Cadence, plus max_steps as a run end."""
    last = step == total
    at_max = max_steps is not None and step == max_steps and not last
    end = "plan" if last else "max_steps" if at_max else "stop_request" if stop else None
    evaluate = evaluates and (bool(ev and step % ev == 0) or step in ends)
    return Actions(log=step % log == 0 or last or evaluate or end is not None, eval=evaluate,
                   checkpoint=bool(ckpt and step % ckpt == 0) or (step in ends and ckpt_phase_end) or end is not None,
                   phase_end=step in ends, end=end)


def test_decide_matches_the_reference_at_every_step():
    for log, ev, evaluates, ckpt, ckpt_phase_end, max_steps in itertools.product(
            (1, 4), (None, 3), (True, False), (None, 7), (True, False), (None, 9, 12, 20, 50)):
        cadence = Cadence(total_steps=20, phase_ends=ENDS, log_interval=log, eval_interval=ev, evaluates=evaluates,
                          checkpoint_interval=ckpt, checkpoint_phase_end=ckpt_phase_end, max_steps=max_steps)
        assert cadence.last_step == min(20, max_steps or 20)
        for step, stop in itertools.product(range(1, cadence.last_step + 1), (False, True)):
            want = _reference(step, 20, ENDS, log, ev, evaluates, ckpt, ckpt_phase_end, max_steps, stop)
            assert cadence.decide(step, stop) == want, (log, ev, evaluates, ckpt, ckpt_phase_end, max_steps, step)


def test_max_steps_ends_with_a_checkpoint_short_of_the_plan():
    cadence = Cadence(total_steps=20, phase_ends=ENDS, log_interval=100, checkpoint_phase_end=False, max_steps=8)
    ends = {s: cadence.decide(s).end for s in range(1, 9)}
    assert ends == {**{s: None for s in range(1, 8)}, 8: "max_steps"}
    assert cadence.decide(8) == Actions(log=True, eval=False, checkpoint=True, phase_end=False, end="max_steps")
    # a stop request at the same step: the asked-for steps are done, so the run ends as finished, not preempted
    assert cadence.decide(8, stop_requested=True).end == "max_steps"
    # at a phase end, the max_steps checkpoint is also the phase's (kept) checkpoint
    assert Cadence(total_steps=20, phase_ends=ENDS, max_steps=12).decide(12).phase_end


def test_the_plan_end_wins_over_a_larger_max_steps_and_a_stop_request():
    cadence = Cadence(total_steps=20, phase_ends=ENDS, max_steps=30)
    assert cadence.last_step == 20 and cadence.decide(20, stop_requested=True).end == "plan"
