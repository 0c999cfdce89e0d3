"""What the user steers with: schedules, prompt files, network bending."""
