# install: system servers and tools (redis-server, prometheus, kcat, a JDK, Maven, nginx to check the
#          compose gateway's config, and chromium for the console's browser tests: Playwright drives it,
#          no browser is downloaded), the package with its dev and local-llm extras, Apache Kafka's jars
#          from Maven (kafka-jars), a Schema Registry (Apicurio's, built from Maven: schema-registry), and
#          helm and kubeconform built from their Go modules into .tools/bin (helm-tools).
# test:    the whole suite (unit, integration and chaos on Apache Kafka, the core on both stand-ins), after install.
# demo:    the service on embedded servers, processing sample tasks.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# llama.cpp's default build picks CPU paths some machines cannot run: build a portable AVX2 one.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install system-deps python-deps kafka-jars schema-registry helm-tools pc-jars lint test test-unit test-integration chaos demo run bench

install: system-deps python-deps kafka-jars schema-registry helm-tools

system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null || ! command -v kcat >/dev/null \
		|| ! command -v java >/dev/null || ! command -v mvn >/dev/null || ! command -v chromium >/dev/null \
		|| ! [ -x /usr/sbin/nginx ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			redis-server prometheus kcat openjdk-17-jre-headless maven chromium nginx-light; \
	fi
	@# the packages start system services: the tests start their own servers on free ports
	@-$(SUDO) service redis-server stop >/dev/null 2>&1; $(SUDO) service prometheus stop >/dev/null 2>&1; \
		$(SUDO) service nginx stop >/dev/null 2>&1; true

python-deps:
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q -e '.[dev,local-llm]'
	@# a user's own agents in a package apart, found by its entry point (tests/integration/test_user_agents.py)
	$(PIP) install -q --no-deps -e tests/agents_pkg

lint:
	ruff check service consumers dedup tests benchmarks
	mypy
	@# a user's package, written against the typed service.sdk: strict, with no casts or asserts for types
	mypy --strict tests/agents_pkg/sample_agents

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-unit:
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

test-integration:
	$(PYTHON) -m pytest tests/integration $(PYTEST_ARGS)

chaos:
	CHAOS_SECONDS=$${CHAOS_SECONDS:-120} CLUSTER_TASKS=$${CLUSTER_TASKS:-10000} $(PYTHON) -m pytest tests/chaos -s $(PYTEST_ARGS)

demo: install
	agent-service demo

run:
	agent-service run --embedded

bench: pc-jars  # make bench BENCH_ARGS='--broker kafka --quick'
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# Apache Kafka's jars from Maven (deploy/kafka/pom.xml) into .kafka/libs, for service/devtools/kafka_jars.py.
# The stamp names the pinned version; a changed pom clears the folder and copies again.
KAFKA_LIBS := $(CURDIR)/.kafka/libs
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_STAMP := $(KAFKA_LIBS)/.kafka-$(KAFKA_VERSION)

kafka-jars: $(KAFKA_STAMP)

$(KAFKA_STAMP): deploy/kafka/pom.xml
	rm -rf $(KAFKA_LIBS)
	mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(KAFKA_LIBS)
	touch $@

# A Schema Registry speaking Confluent's API (Apicurio Registry's application from Maven, built by
# deploy/schema-registry/pom.xml) into .kafka/schema-registry, for service/devtools/schema_registry.py.
REGISTRY_HOME := $(CURDIR)/.kafka/schema-registry
REGISTRY_SRC := deploy/schema-registry
REGISTRY_STAMP := $(REGISTRY_HOME)/.stamp

schema-registry: $(REGISTRY_STAMP)

$(REGISTRY_STAMP): $(REGISTRY_SRC)/pom.xml $(REGISTRY_SRC)/src/main/resources/application.properties
	rm -rf $(REGISTRY_HOME) $(REGISTRY_SRC)/target
	mvn -q -B -f $(REGISTRY_SRC)/pom.xml package
	mkdir -p $(REGISTRY_HOME)
	cp -r $(REGISTRY_SRC)/target/lib $(REGISTRY_SRC)/target/*-runner.jar $(REGISTRY_HOME)/
	rm -rf $(REGISTRY_SRC)/target
	touch $@

# Confluent's Parallel Consumer (benchmarks/parallel_consumer/pom.xml) into .kafka/pc-libs, for the
# parallel_consumer benchmark's Java anchor.
PC_LIBS := $(CURDIR)/.kafka/pc-libs
PC_STAMP := $(PC_LIBS)/.stamp

pc-jars: $(PC_STAMP)

$(PC_STAMP): benchmarks/parallel_consumer/pom.xml
	rm -rf $(PC_LIBS)
	mvn -q -B -f benchmarks/parallel_consumer/pom.xml dependency:copy-dependencies -DoutputDirectory=$(PC_LIBS)
	touch $@

# helm and kubeconform for the chart's render checks (tests/unit/test_helm_chart.py), built from their Go
# modules into .tools/bin; the stamps name the pinned versions, so a bumped one is built again. The CRD
# kinds' schemas come from cloudcoil's models of those CRDs, in a virtual environment of their own
# (cloudcoil brings a pytest plugin that does not belong in the project's environment).
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
TOOLS_BIN := $(CURDIR)/.tools/bin
HELM_VERSION := v4.3.2
KUBECONFORM_VERSION := v0.8.0
CRD_MODELS := cloudcoil-models-prometheus-operator==0.80.1.0 cloudcoil-models-keda==2.16.1.0
CRD_VENV := $(CURDIR)/.tools/crd-venv
CRD_SCHEMAS := $(CURDIR)/.tools/crd-schemas

helm-tools: $(TOOLS_BIN)/.helm-$(HELM_VERSION) $(TOOLS_BIN)/.kubeconform-$(KUBECONFORM_VERSION) $(CRD_SCHEMAS)/.stamp

$(CRD_SCHEMAS)/.stamp: deploy/helm/crd_schemas.py
	rm -rf $(CRD_VENV) $(CRD_SCHEMAS)
	$(PYTHON) -m venv $(CRD_VENV)
	$(CRD_VENV)/bin/python -m pip install -q $(CRD_MODELS)
	$(CRD_VENV)/bin/python deploy/helm/crd_schemas.py $(CRD_SCHEMAS)
	touch $@

$(TOOLS_BIN)/.helm-$(HELM_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)
	touch $@

$(TOOLS_BIN)/.kubeconform-$(KUBECONFORM_VERSION):
	mkdir -p $(TOOLS_BIN)
	GOBIN=$(TOOLS_BIN) $(GO) install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)
	touch $@
