"""Property-based run of the API's own OpenAPI document against the live app (schemathesis, bounded examples): no
request it can generate gets a 5xx, and every response matches the document (status, content type, schema), wrong
methods get 405 with `Allow`, and schema-invalid requests are rejected. One check is left out on purpose:
`positive_data_acceptance` expects every schema-valid request to succeed, but no JSON schema can say "a 224x224 RGB
PNG", so schema-valid random bytes are rightly answered 422."""
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from mhist_nb.api import ServeConfig, create_app
from mhist_nb.toy_models import toy_model_dir

APP = create_app(ServeConfig(model_dir=str(toy_model_dir(Path(tempfile.mkdtemp(prefix='mhist-openapi-'))/'models')),
                             max_batch=4))
schema = schemathesis.openapi.from_wsgi('/openapi.json', APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_openapi_document(case):
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])


def test_openapi_document_is_valid_openapi_3_0():
    "The served document, as a client downloads it, passes the official validator for the version it declares."
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
    doc = APP.test_client().get('/openapi.json').get_json()
    assert doc['openapi'] == '3.0.3'
    validate(doc)
    bad = {**doc, 'components': {'schemas': {**doc['components']['schemas'], 'X': {'type': 'string', 'format': 1}}}}
    try: validate(bad)                                     # the validator does reject a broken document
    except OpenAPIValidationError: pass
    else: raise AssertionError('validator accepted a schema with a numeric format')
