{{/* Names and labels. */}}
{{- define "nexus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nexus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "nexus.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "nexus.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/*
`<fullname>-<suffix>` in at most 63 characters: the full name is cut, never the suffix, so two
components never share a name. Args: (dict "root" $ "suffix" S).
*/}}
{{- define "nexus.componentName" -}}
{{- $room := int (sub 62 (len .suffix)) -}}
{{- if lt $room 1 }}{{ fail (printf "`%s` is too long for a Kubernetes name suffix" .suffix) }}{{ end -}}
{{- printf "%s-%s" (include "nexus.fullname" .root | trunc $room | trimSuffix "-") .suffix -}}
{{- end -}}

{{- define "nexus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nexus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nexus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "nexus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "nexus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "nexus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "nexus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The image with a component's own tag, if set: (dict "root" $ "tag" TAG). */}}
{{- define "nexus.componentImage" -}}
{{- if .tag -}}
{{- printf "%s:%s" .root.Values.image.repository .tag -}}
{{- else -}}
{{- include "nexus.image" .root -}}
{{- end -}}
{{- end -}}

{{/* The topology as a dict: values `topology` or the chart's copy of topology/nexus.yaml. */}}
{{- define "nexus.topologyText" -}}
{{- default (.Files.Get "files/topology.yaml") .Values.topology -}}
{{- end -}}

{{/* Worker roles to deploy, as a JSON list of topology role dicts (non-broadcast). */}}
{{- define "nexus.workerRoles" -}}
{{- $topo := include "nexus.topologyText" . | fromYaml -}}
{{- $known := dict -}}
{{- range $topo.roles }}{{- if not .broadcast }}{{- $_ := set $known .name . }}{{- end }}{{- end -}}
{{- $out := list -}}
{{- if .Values.workers.roles -}}
{{- range .Values.workers.roles -}}
{{- if not (hasKey $known .) -}}
{{- fail (printf "workers.roles: `%s` is not a worker role of the topology (have: %s)" . (keys $known | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $out = append $out (get $known .) -}}
{{- end -}}
{{- else -}}
{{- range $topo.roles }}{{- if not .broadcast }}{{- $out = append $out . }}{{- end }}{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* Partitions per topic, as a JSON dict. */}}
{{- define "nexus.partitions" -}}
{{- $topo := include "nexus.topologyText" . | fromYaml -}}
{{- $out := dict -}}
{{- range $topo.topics }}{{- $_ := set $out .name (int .partitions) }}{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "nexus.busUrl" -}}
{{- if eq .Values.bus.kind "kafka" -}}
{{- printf "%s://%s" (ternary "kafka+ssl" "kafka" .Values.bus.tls) .Values.bus.kafka.brokers -}}
{{- else if eq .Values.bus.kind "nats" -}}
{{- printf "%s://%s" (ternary "tls" "nats" .Values.bus.tls) .Values.bus.nats.servers -}}
{{- else -}}
{{- fail (printf "bus.kind must be kafka or nats, not `%s` (the embedded bus is for `nexus dev`)" .Values.bus.kind) -}}
{{- end -}}
{{- end -}}

{{/*
The effective config: values `config` with the keys the chart owns set over it. Refuses secret
keys set inline: they belong in Secrets.
*/}}
{{- define "nexus.config" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $secretKeys := list "bus.kafka.sasl_password" "bus.nats.password" "bus.nats.token" "http.admin_token" "stores.postgres_url" "stores.redis_url" "stores.provisioning_key" "chat.client_key_secret" "workers.history.ucs.credential" "workers.gws.credential" -}}
{{- range $secretKeys -}}
{{- $parts := splitList "." . -}}
{{- $node := $c -}}
{{- range $i, $p := $parts -}}
{{- if kindIs "map" $node -}}
{{- $node = get $node $p -}}
{{- else -}}
{{- $node = "" -}}
{{- end -}}
{{- end -}}
{{- if $node -}}
{{- fail (printf "config.%s is a secret: reference an existing Secret under `secrets`, never inline in values" .) -}}
{{- end -}}
{{- end -}}
{{- range $peer := list "workers.gws" "workers.history.ucs" -}}
{{- $node := $c -}}
{{- range $p := splitList "." $peer -}}
{{- if kindIs "map" $node -}}
{{- $node = get $node $p -}}
{{- end -}}
{{- end -}}
{{- $tenants := dict -}}
{{- if kindIs "map" $node -}}
{{- $tenants = get $node "tenants" -}}
{{- end -}}
{{- if kindIs "map" $tenants -}}
{{- range $tenant, $t := $tenants -}}
{{- if and (kindIs "map" $t) (get $t "credential") -}}
{{- fail (printf "config.%s.tenants.%s.credential is a secret: reference an existing Secret under `secrets`, never inline in values" $peer $tenant) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $bus := dict "url" (include "nexus.busUrl" .) -}}
{{- if .Values.bus.caSecret }}{{- $_ := set $bus "ca_file" "/etc/nexus/bus-ca/ca.crt" }}{{- end -}}
{{- if .Values.bus.clientCertSecret -}}
{{- $_ := set $bus "client_cert_file" "/etc/nexus/bus-client/tls.crt" -}}
{{- $_ := set $bus "client_key_file" "/etc/nexus/bus-client/tls.key" -}}
{{- end -}}
{{- if dig "http" "listen" "" $c }}{{ fail "config.http.listen is set by the chart: use listenAddress (the port stays 8080)" }}{{ end -}}
{{- $host := .Values.listenAddress | default "0.0.0.0" | toString -}}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}{{ $host = printf "[%s]" $host }}{{ end -}}
{{- $http := dict "listen" (printf "%s:8080" $host) -}}
{{- if .Values.tls.secretName -}}
{{- $_ := set $http "tls_cert_file" "/etc/nexus/tls/tls.crt" -}}
{{- $_ := set $http "tls_key_file" "/etc/nexus/tls/tls.key" -}}
{{- end -}}
{{- $stores := dict "data_dir" "/var/lib/nexus" -}}
{{- if .Values.redisCaSecret }}{{- $_ := set $stores "redis_ca_file" "/etc/nexus/redis-ca/ca.crt" }}{{- end -}}
{{- $owned := dict "bus" $bus "http" $http "stores" $stores "topology" (dict "file" "/etc/nexus/topology.yaml") -}}
{{- if .Values.httpClientCaSecret }}{{- $_ := set $owned "http_client" (dict "ca_file" "/etc/nexus/http-ca/ca.crt") }}{{- end -}}
{{- $c = mergeOverwrite $c $owned -}}
{{- include "nexus.toml" (dict "table" $c "prefix" "") -}}
{{- end -}}

{{/*
A dict as TOML (Helm's toToml writes whole numbers from YAML as floats, which nexus's integer
keys refuse). Scalars first, then sub-tables, keys sorted.
*/}}
{{- define "nexus.toml" -}}
{{- $t := .table -}}
{{- $prefix := .prefix -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $v := get $t $k -}}
{{- if not (kindIs "map" $v) }}
{{ include "nexus.tomlKey" $k }} = {{ include "nexus.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- range $k := keys $t | sortAlpha -}}
{{- $v := get $t $k -}}
{{- if kindIs "map" $v -}}
{{- $key := include "nexus.tomlKey" $k -}}
{{- $name := ternary $key (printf "%s.%s" $prefix $key) (eq $prefix "") }}

[{{ $name }}]
{{- include "nexus.toml" (dict "table" $v "prefix" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A TOML key: bare when it can be, quoted otherwise (a tenant id such as `acme.eu`). */}}
{{- define "nexus.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end -}}
{{- end -}}

{{- define "nexus.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) -}}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "nexus.tomlValue" $e }}{{ end -}}]
{{- else if kindIs "invalid" . -}}
""
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* An env var from an existing Secret, if its `name` is set: args (dict "env" NAME "ref" {name,key}). */}}
{{- define "nexus.secretEnv" -}}
{{- if .ref.name }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name }}
      key: {{ .ref.key }}
{{- end -}}
{{- end -}}

{{/*
Extra env (edge.env, workers.*.env) with a secret config key (a password, token, credential,
store URL or key, per-tenant ones too) as a literal `value`: refused like the same key under
`config`. Args: (dict "what" WHERE "env" LIST).
*/}}
{{- define "nexus.checkEnv" -}}
{{- range .env -}}
{{- if and (kindIs "map" .) (get . "value") (regexMatch "^NEXUS_.*__(SASL_PASSWORD|PASSWORD|TOKEN|ADMIN_TOKEN|CREDENTIAL|POSTGRES_URL|REDIS_URL|PROVISIONING_KEY|CLIENT_KEY_SECRET)$" (upper (toString (get . "name")))) -}}
{{- fail (printf "%s: %s is a secret: take it from a Secret (valueFrom.secretKeyRef), never a literal value in values" $.what (get . "name")) -}}
{{- end -}}
{{- if and (kindIs "map" .) (eq (upper (toString (get . "name"))) "NEXUS_HTTP__LISTEN") -}}
{{- fail (printf "%s: NEXUS_HTTP__LISTEN is set by the chart (probes and ports follow it): use listenAddress" $.what) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Env every nexus pod gets: config file, bus credentials, stores. */}}
{{- define "nexus.commonEnv" -}}
- name: NEXUS_CONFIG
  value: /etc/nexus/config.toml
{{- include "nexus.secretEnv" (dict "env" "NEXUS_BUS__KAFKA__SASL_PASSWORD" "ref" .Values.secrets.kafkaSaslPassword) }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_BUS__NATS__PASSWORD" "ref" .Values.secrets.natsPassword) }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_BUS__NATS__TOKEN" "ref" .Values.secrets.natsToken) }}
{{- end -}}

{{/* A peer's credential, only in the pods of the role that calls it (history → UCS, gws → GWS): args (dict "root" $ "role" name). */}}
{{- define "nexus.peerEnv" -}}
{{- if eq .role "history" }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL" "ref" .root.Values.secrets.ucsCredential) }}
{{- else if eq .role "gws" }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_WORKERS__GWS__CREDENTIAL" "ref" .root.Values.secrets.gwsCredential) }}
{{- end -}}
{{- end -}}

{{- define "nexus.storeEnv" -}}
{{- if not .Values.secrets.postgresUrl.name }}{{ fail "secrets.postgresUrl.name is required: pods share one PostgreSQL" }}{{ end -}}
{{- if not .Values.secrets.redisUrl.name }}{{ fail "secrets.redisUrl.name is required: pods share one Redis" }}{{ end -}}
{{- if not .Values.secrets.provisioningKey.name }}{{ fail "secrets.provisioningKey.name is required: pods share one key" }}{{ end -}}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_STORES__POSTGRES_URL" "ref" .Values.secrets.postgresUrl) }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_STORES__REDIS_URL" "ref" .Values.secrets.redisUrl) }}
{{- include "nexus.secretEnv" (dict "env" "NEXUS_STORES__PROVISIONING_KEY" "ref" .Values.secrets.provisioningKey) }}
{{- end -}}

{{/* Volumes and mounts every nexus pod gets; arg: (dict "root" $ "configMap" NAME). */}}
{{- define "nexus.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: data
  emptyDir: {}
{{- with .root.Values.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .root.Values.bus.caSecret }}
- name: bus-ca
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .root.Values.bus.clientCertSecret }}
- name: bus-client
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .root.Values.redisCaSecret }}
- name: redis-ca
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .root.Values.httpClientCaSecret }}
- name: http-ca
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{- define "nexus.volumeMounts" -}}
- name: config
  mountPath: /etc/nexus/config.toml
  subPath: config.toml
  readOnly: true
- name: config
  mountPath: /etc/nexus/topology.yaml
  subPath: topology.yaml
  readOnly: true
- name: data
  mountPath: /var/lib/nexus
{{- if .Values.tls.secretName }}
- name: tls
  mountPath: /etc/nexus/tls
  readOnly: true
{{- end }}
{{- if .Values.bus.caSecret }}
- name: bus-ca
  mountPath: /etc/nexus/bus-ca
  readOnly: true
{{- end }}
{{- if .Values.bus.clientCertSecret }}
- name: bus-client
  mountPath: /etc/nexus/bus-client
  readOnly: true
{{- end }}
{{- if .Values.redisCaSecret }}
- name: redis-ca
  mountPath: /etc/nexus/redis-ca
  readOnly: true
{{- end }}
{{- if .Values.httpClientCaSecret }}
- name: http-ca
  mountPath: /etc/nexus/http-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Where every nexus pod may run, the hook Job's included. */}}
{{- define "nexus.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{ toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{ toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Startup and liveness on /healthz, readiness on /readyz (bus and stores reachable). A pod listens
only once it joined the bus and stores and applied the database migrations (minutes for a large
one, or behind another pod's migration lock): the startup probe gives it that time, then liveness
takes over.
*/}}
{{- define "nexus.probes" -}}
{{- $scheme := ternary "HTTPS" "HTTP" (ne .Values.tls.secretName "") -}}
startupProbe:
  httpGet: {path: /healthz, port: http, scheme: {{ $scheme }}}
  {{- toYaml .Values.probes.startup | nindent 2 }}
livenessProbe:
  httpGet: {path: /healthz, port: http, scheme: {{ $scheme }}}
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: http, scheme: {{ $scheme }}}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end -}}

{{/*
The ms value of config key `key` (e.g. consumer.drain_ms) a pod runs with: its env override
(NEXUS_CONSUMER__DRAIN_MS, any case) if set, else `config`, else `default`. An override from a
Secret or ConfigMap cannot be checked: refused. Args: (dict "root" $ "what" W "env" LIST "key" K "default" D).
*/}}
{{- define "nexus.effectiveMs" -}}
{{- $v := .default -}}
{{- $at := .root.Values.config | default dict -}}
{{- range $i, $part := splitList "." .key -}}
{{- if and (kindIs "map" $at) (hasKey $at $part) -}}
{{- $at = get $at $part -}}
{{- else -}}
{{- $at = dict -}}
{{- end -}}
{{- end -}}
{{- if not (kindIs "map" $at) -}}{{- $v = $at -}}{{- end -}}
{{- $var := printf "NEXUS_%s" (.key | replace "." "__" | upper) -}}
{{- range .env -}}
{{- if and (kindIs "map" .) (eq (upper (toString (get . "name"))) $var) -}}
{{- if not (regexMatch "^[0-9]+$" (toString (get . "value"))) -}}
{{- fail (printf "%s: env %s must be a literal number of ms: the chart checks terminationGracePeriodSeconds against it" $.what (get . "name")) -}}
{{- end -}}
{{- $v = get . "value" -}}
{{- end -}}
{{- end -}}
{{- int64 $v -}}
{{- end -}}

{{/*
A PodDisruptionBudget's budget that never blocks a node drain: maxUnavailable (a count or a
percentage, which Kubernetes rounds up to a pod) lets a pod go even when only one runs. 0 and
minAvailable (which blocks every drain while the pods are no more than it) are refused.
Args: (dict "what" W "pdb" P).
*/}}
{{- define "nexus.pdbBudget" -}}
{{- if .pdb.minAvailable -}}
{{- fail (printf "%s: pdb.minAvailable would block every node drain while the pods are no more than it: use pdb.maxUnavailable" .what) -}}
{{- end -}}
{{- if not (regexMatch "^([1-9][0-9]*|[0-9]*[1-9][0-9]*%)$" (toString .pdb.maxUnavailable)) -}}
{{- fail (printf "%s: pdb.maxUnavailable must be at least 1 or 1%% (0 blocks every node drain), not %v" .what .pdb.maxUnavailable) -}}
{{- end -}}
maxUnavailable: {{ .pdb.maxUnavailable }}
{{- end -}}

{{/* Fails unless `grace` (s) leaves `needMs` of draining plus 5 s to exit. */}}
{{- define "nexus.checkGrace" -}}
{{- $need := add (div (int64 .needMs) 1000) 5 -}}
{{- if lt (int64 .grace) (int64 $need) -}}
{{- fail (printf "%s: terminationGracePeriodSeconds %v is too short to drain (%s = %vms; need at least %v)" .what .grace .key .needMs $need) -}}
{{- end -}}
{{- end -}}

{{- /* TOKIO_WORKER_THREADS from asyncThreads: a positive count, or "auto" for one thread per
CPU the container may use (tokio reads the cgroup quota; without a CPU limit, every node core). */}}
{{- define "nexus.asyncThreadsEnv" -}}
{{- $v := toString .value -}}
{{- if ne $v "auto" -}}
{{- if not (regexMatch "^[1-9][0-9]*$" $v) -}}
{{- fail (printf "%s: asyncThreads must be a positive number or \"auto\", not %q" .what $v) -}}
{{- end -}}
- {name: TOKIO_WORKER_THREADS, value: {{ $v | quote }}}
{{- end -}}
{{- end -}}

{{/*
A Kubernetes quantity (250m, 2, 1.5Gi, 512M) in thousandths of its unit, or "" for a form this
does not read (the API server still validates it).
*/}}
{{- define "nexus.milliQuantity" -}}
{{- $q := toString . -}}
{{- $re := "^([0-9]+\\.?[0-9]*|\\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$" -}}
{{- if regexMatch $re $q -}}
{{- $scale := dict "" 1000 "m" 1 "k" 1e6 "M" 1e9 "G" 1e12 "T" 1e15 "P" 1e18 "E" 1e21 "Ki" 1024000 "Mi" 1048576000 "Gi" 1073741824000 "Ti" 1099511627776000 "Pi" 1125899906842624000 "Ei" 1152921504606846976000.0 -}}
{{- mulf (regexReplaceAll $re $q "${1}") (get $scale (regexReplaceAll $re $q "${2}")) -}}
{{- end -}}
{{- end -}}

{{/*
A container's `resources`, as given (never merged with defaults), or when empty the chart's
default (requests 250m CPU, 256Mi; limit 512Mi). Refused when a request exceeds its limit (the
API server would refuse the pod). Args: (dict "what" W "resources" R).
*/}}
{{- define "nexus.resources" -}}
{{- $r := .resources | default (dict "requests" (dict "cpu" "250m" "memory" "256Mi") "limits" (dict "memory" "512Mi")) -}}
{{- $limits := get $r "limits" | default dict -}}
{{- range $k, $req := get $r "requests" | default dict -}}
{{- if hasKey $limits $k -}}
{{- $a := include "nexus.milliQuantity" $req -}}
{{- $b := include "nexus.milliQuantity" (get $limits $k) -}}
{{- if and $a $b (gt (float64 $a) (float64 $b)) -}}
{{- fail (printf "%s: resources.requests.%s %v exceeds resources.limits.%s %v: the API server would refuse the pod" $.what $k $req $k (get $limits $k)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "nexus.configChecksum" -}}
{{- include "nexus.config" . | cat (include "nexus.topologyText" .) | sha256sum -}}
{{- end -}}
