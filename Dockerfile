# adevents: one image for every service (generate, consume, serve, scheduler, ...).
# Build: docker build -t adevents:0.1.0 .    Run: docker compose up
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from the runtime lock alone (exact versions, every file's hash checked:
# the versions the test suite ran on): this layer is rebuilt only when the lock changes, not on
# every code change. (Every locked dependency ships manylinux wheels: no compiler for them.)
COPY requirements/runtime.lock ./requirements/
RUN pip install --require-hashes -r requirements/runtime.lock

# Then the code, installed without touching the dependency layer. The package has one compiled
# part, the embedded key cache's table (pipeline/_keytable.c, which includes the Redis module's
# redis_module/keytable.h): gcc is installed, used and removed in the one step, so the image
# carries the built table and no compiler.
COPY pyproject.toml README.md MANIFEST.in ./
COPY redis_module/keytable.h ./redis_module/
COPY pipeline ./pipeline
COPY generator ./generator
COPY queries ./queries
COPY api ./api
COPY jobs ./jobs
COPY lake ./lake
COPY cli ./cli
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-deps . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* build ./*.egg-info

# Not root: a system user owning only the data directory (a named volume mounted on /data
# starts with this ownership).
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin adevents \
    && mkdir -p /data \
    && chown adevents:adevents /data
USER adevents
ENV DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

CMD ["adevents", "--help"]
