{{/*
Helpers, hierarchical (JobSet style): lopd.<object>.<part>. Templates compose them:
  lopd.pod.template = metadata (lopd.labels) + lopd.pod.spec
  lopd.pod.spec     = lopd.pod.securityContext + lopd.pod.scheduling + lopd.container + lopd.pod.volumes
  lopd.container    = lopd.container.command + .env + .envFrom + .resources + .volumeMounts + .securityContext
*/}}

{{/* ------------------------------------------------------------------ names */}}

{{- define "lopd.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name is already lopd-<run>-<stage> (lopd render); do not repeat the chart name. */}}
{{- define "lopd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Chart.Name .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lopd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lopd.serviceAccountName" -}}
{{- if .Values.serviceAccount.enabled -}}
{{- default (include "lopd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.enabled is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lopd.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* ------------------------------------------------------------------ labels */}}

{{- define "lopd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lopd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lopd.labels" -}}
{{ include "lopd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .Values.stage }}
app.kubernetes.io/part-of: lopd
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "lopd.chart" . }}
lopd.io/run: {{ .Values.runId }}
lopd.io/stage: {{ .Values.stage }}
{{- end -}}

{{/* Labels of the workload object itself: the Kueue queue goes there, not on the pods. */}}
{{- define "lopd.workload.labels" -}}
{{ include "lopd.labels" . }}
{{- include "lopd.kueue.labels" . }}
{{- end -}}

{{/* Kueue's queue and workload priority class: on every workload that takes GPUs (Jobs,
PyTorchJobs, the teacher Deployment and its pods). */}}
{{- define "lopd.kueue.labels" -}}
{{- if .Values.kueue.enabled }}
kueue.x-k8s.io/queue-name: {{ .Values.kueue.queueName }}
{{- with .Values.kueue.priorityClass }}
kueue.x-k8s.io/priority-class: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ------------------------------------------------------------------ stage kind and command */}}

{{- define "lopd.stage.isTraining" -}}
{{- if .Values.training -}}true{{- end -}}
{{- end -}}

{{/* Job (Indexed) for inference, Job (torchrun, one node) or PyTorchJob (nodes > 1) for training. */}}
{{- define "lopd.stage.kind" -}}
{{- if and (include "lopd.stage.isTraining" .) (gt (int .Values.resources.nodes) 1) -}}PyTorchJob{{- else -}}Job{{- end -}}
{{- end -}}

{{- define "lopd.stage.nprocPerNode" -}}
{{- max 1 (int .Values.resources.gpusPerNode) -}}
{{- end -}}

{{- define "lopd.recipe.path" -}}/etc/lopd/recipe.yaml{{- end -}}

{{/* The container command as a YAML list. Training: torchrun (PET_NODE_RANK / PET_MASTER_ADDR /
PET_MASTER_PORT come from the training operator on a PyTorchJob); inference: one shard per
completion, the shard index from JOB_COMPLETION_INDEX. */}}
{{- define "lopd.container.command" -}}
{{- $args := list "--recipe" (include "lopd.recipe.path" .) -}}
{{- $cmd := list -}}
{{- if include "lopd.stage.isTraining" . -}}
{{- $cmd = list "python" "-m" "torch.distributed.run" -}}
{{- if gt (int .Values.resources.nodes) 1 -}}
{{- $cmd = append $cmd (printf "--nnodes=%d" (int .Values.resources.nodes)) -}}
{{- else -}}
{{- $cmd = concat $cmd (list "--standalone" "--nnodes=1") -}}
{{- end -}}
{{- $cmd = concat $cmd (list (printf "--nproc-per-node=%s" (include "lopd.stage.nprocPerNode" .)) "-m" .Values.module) -}}
{{- else -}}
{{- $cmd = list "python" "-m" .Values.module -}}
{{- $args = concat $args (list "--num-shards" (toString (int .Values.shards))) -}}
{{- end -}}
{{- toYaml (concat $cmd $args .Values.job.extraArgs) -}}
{{- end -}}

{{/* ------------------------------------------------------------------ container */}}

{{- define "lopd.container.env" -}}
- name: LOPD_RUN_ID
  value: {{ .Values.runId | quote }}
- name: LOPD_STAGE
  value: {{ .Values.stage | quote }}
- name: HF_HOME
  value: /cache/hf
- name: LOPD_CACHE
  value: /cache/lopd
- name: TMPDIR
  value: /scratch
- name: PYTHONUNBUFFERED
  value: "1"
- name: LOPD_TERMINATION_LOG
  value: /dev/termination-log
- name: LOPD_LOG_TO_STORE
  value: "1"
{{- if eq .Values.stage "eval" }}
- name: LOPD_UNDUMPABLE
  value: "1"
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "lopd.container.envFrom" -}}
{{- if .Values.storage.secret.enabled -}}
envFrom:
  - secretRef:
      name: {{ .Values.storage.secret.name }}
{{- end -}}
{{- end -}}

{{- define "lopd.container.resources" -}}
requests:
  cpu: {{ .Values.resources.cpu | quote }}
  memory: {{ .Values.resources.memory | quote }}
  {{- if gt (int .Values.resources.gpusPerNode) 0 }}
  nvidia.com/gpu: {{ .Values.resources.gpusPerNode }}
  {{- end }}
limits:
  memory: {{ .Values.resources.memory | quote }}
  {{- if gt (int .Values.resources.gpusPerNode) 0 }}
  nvidia.com/gpu: {{ .Values.resources.gpusPerNode }}
  {{- end }}
{{- end -}}

{{- define "lopd.container.securityContext" -}}
allowPrivilegeEscalation: false
privileged: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "lopd.container.volumeMounts" -}}
- name: recipe
  mountPath: /etc/lopd
  readOnly: true
- name: dshm
  mountPath: /dev/shm
- name: cache
  mountPath: /cache
- name: scratch
  mountPath: /scratch
{{- end -}}

{{/* Call with (dict "root" $ "name" "lopd"): the stage container. */}}
{{- define "lopd.container" -}}
{{- $ := .root -}}
- name: {{ .name }}
  image: {{ include "lopd.image" $ }}
  imagePullPolicy: {{ $.Values.image.pullPolicy }}
  command:
    {{- include "lopd.container.command" $ | nindent 4 }}
  terminationMessagePolicy: FallbackToLogsOnError
  env:
    {{- include "lopd.container.env" $ | nindent 4 }}
  {{- with (include "lopd.container.envFrom" $) }}
  {{- . | nindent 2 }}
  {{- end }}
  resources:
    {{- include "lopd.container.resources" $ | nindent 4 }}
  securityContext:
    {{- include "lopd.container.securityContext" $ | nindent 4 }}
  volumeMounts:
    {{- include "lopd.container.volumeMounts" $ | nindent 4 }}
{{- end -}}

{{/* ------------------------------------------------------------------ pod */}}

{{- define "lopd.pod.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lopd.pod.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "lopd.pod.volumes" -}}
- name: recipe
  configMap:
    name: {{ include "lopd.fullname" . }}-recipe
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.resources.shmSize }}
- name: cache
  {{- if .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
  {{- end }}
- name: scratch
  emptyDir: {}
{{- end -}}

{{/* Call with (dict "root" $ "restartPolicy" "Never" "container" "lopd"). */}}
{{- define "lopd.pod.spec" -}}
{{- $ := .root -}}
restartPolicy: {{ .restartPolicy }}
serviceAccountName: {{ include "lopd.serviceAccountName" $ }}
automountServiceAccountToken: false
securityContext:
  {{- include "lopd.pod.securityContext" $ | nindent 2 }}
{{- with (include "lopd.pod.scheduling" $) }}
{{- . }}
{{- end }}
containers:
  {{- include "lopd.container" (dict "root" $ "name" .container) | nindent 2 }}
volumes:
  {{- include "lopd.pod.volumes" $ | nindent 2 }}
{{- end -}}

{{- define "lopd.pod.template" -}}
{{- $ := .root -}}
metadata:
  labels:
    {{- include "lopd.labels" $ | nindent 4 }}
  annotations:
    checksum/recipe: {{ $.Values.recipe.content | sha256sum }}
spec:
  {{- include "lopd.pod.spec" . | nindent 2 }}
{{- end -}}

{{/* ------------------------------------------------------------------ job policy */}}

{{/* Preemptions / evictions / node drains do not use up retries; a bad recipe or input
(lopd exits 2 with a one-line error) fails at once instead of retrying: the shard (FailIndex)
of an Indexed Job, whose shards retry on their own (backoffLimitPerIndex), else the Job.
Call with (dict "container" "lopd" "indexed" true). */}}
{{- define "lopd.job.podFailurePolicy" -}}
rules:
  - action: Ignore
    onPodConditions:
      - type: DisruptionTarget
        status: "True"
  - action: {{ ternary "FailIndex" "FailJob" (default false .indexed) }}
    onExitCodes:
      containerName: {{ .container }}
      operator: In
      values: [2]
{{- end -}}
