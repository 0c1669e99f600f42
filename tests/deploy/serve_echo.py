"""A second, unrelated Serve application (import path `serve_echo:app`) that `flotilla deploy`
and `flotilla delete` must leave as it is."""

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Echo:
    def __call__(self, request) -> str:
        return "echo"


app = Echo.bind()
