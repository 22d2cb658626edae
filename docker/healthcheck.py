"""Container health check of the API image (slim images have no curl): exit 0 if GET /health answers 200 on the port
the server listens on: $PORT (default 8000) for the image's CMD, or 8080 ($SAGEMAKER_BIND_TO_PORT) when the container
was started as `serve` for SageMaker. Exit 1, with the reason on stderr, otherwise."""
import os, sys, urllib.request

ports = dict.fromkeys([os.environ.get('PORT') or '8000', os.environ.get('SAGEMAKER_BIND_TO_PORT') or '8080'])
errors = []
for port in ports:
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as r:
            if r.status == 200: sys.exit(0)
            errors.append(f'{port}: HTTP {r.status}')
    except OSError as e: errors.append(f'{port}: {e}')
print('unhealthy: ' + '; '.join(errors), file=sys.stderr)
sys.exit(1)
