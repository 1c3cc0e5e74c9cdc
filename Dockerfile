# adevents: one image for every service (generate, consume, serve, scheduler, ...).
# Build: docker build -t adevents:0.1.0 .    Run: docker compose up
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only when the
# dependencies change, not on every code change. (Every dependency ships manylinux wheels,
# so no compiler is needed.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the code, installed without touching the dependency layer.
COPY README.md ./
COPY pipeline ./pipeline
COPY generator ./generator
COPY queries ./queries
COPY api ./api
RUN pip install --no-deps . && rm -rf build ./*.egg-info

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
