"""Operating breedlabel on a Ray cluster: job submission, runtime env, schedules, config checks."""
