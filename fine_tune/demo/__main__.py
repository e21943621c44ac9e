from .run import demo_command

demo_command(prog_name="python -m fine_tune.demo")
