from benchmarks.time_repro import by_group, stage_seconds


def test_a_stage_runs_until_the_next_one_starts_and_groups_add_up():
    events = [(100.0, "Stage 'synth' didn't change, skipping"),
              (101.0, "Running stage 'pretrain@d3ssl-0':"),
              (131.0, "Running stage 'pretrain@d3ssl-1':"),
              (171.0, "Stage 'export@d3ssl-0' didn't change, skipping"),
              (172.0, "Running stage 'report':")]
    seconds = stage_seconds(events, end=174.5)
    assert seconds == {"pretrain@d3ssl-0": 30.0, "pretrain@d3ssl-1": 40.0, "report": 2.5}
    assert by_group(seconds) == {"pretrain": 70.0, "report": 2.5}
