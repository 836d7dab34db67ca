#!/bin/sh
# Entrypoint of the ndvi-scale image (run under tini, which forwards signals and reaps zombies).
#
# Default: `ndvi-scale ARGS`, so `docker run IMAGE compute --config run.yaml` and a Kubernetes container with
# `args: [compute, ...]` run the CLI. Dask Gateway and the dask-kubernetes operator start schedulers and
# workers by setting only the container's args (`dask scheduler ...`, `dask worker ...`), and JupyterHub
# starts `jupyterhub-singleuser`: such a command is executed as it is. That is what lets one image, hence one
# Python environment, serve the CronJob (client), the Dask scheduler and workers, and the notebooks.
set -eu
case "${1:-}" in
    dask | dask-* | python | python3 | python3.* | jupyterhub-singleuser | jupyter | jupyter-* | sh | bash | /*)
        exec "$@"
        ;;
esac
exec ndvi-scale "$@"
