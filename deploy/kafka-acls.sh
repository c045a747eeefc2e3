#!/usr/bin/env bash
# Create the taoflow topics and grant each component's principal only what its code does.
# Who does what (from the code; keep in step with it):
#   sdk      agents' Emitter (taoflow/emitter.py): writes interactions, feedback
#   gateway  serving/gateway.py: writes interactions, feedback (its Emitter) and adapters (promotion/rollback events);
#            reads utilities and adapters (assigned partitions, no consumer group)
#   worker   streams/: reads interactions, feedback (group <app_id>); writes scores, utilities, dead-letters and its
#            table changelogs (<app_id>-*); its Parquet landers read the event tables (group <app_id>-parquet)
#   lander   streams/lander.py: reads every taoflow topic (group <app_id>-lander); writes none
#   learner  learners/records.py: writes adapters (published adapters) and learner.records (its round rows)
# Only the learner and the gateway can write taoflow.adapters; only the workers can write taoflow.utilities.
# Environment: ACL_BOOTSTRAP, ACL_ADMIN_PASSWORD, ACL_PARTITIONS (12), ACL_REPLICATION (3), ACL_APP_ID
# (taoflow-worker, TAOFLOW_STREAM_APP_ID). Idempotent: run it again after changing it.
set -euo pipefail

BIN=/opt/kafka/bin
BOOTSTRAP=${ACL_BOOTSTRAP:?set ACL_BOOTSTRAP to host:port}
PARTITIONS=${ACL_PARTITIONS:-12}
REPLICATION=${ACL_REPLICATION:-3}
APP_ID=${ACL_APP_ID:-taoflow-worker}
CONFIG=$(mktemp)
trap 'rm -f "$CONFIG"' EXIT
chmod 600 "$CONFIG"
cat >"$CONFIG" <<PROPS
security.protocol=${ACL_SECURITY_PROTOCOL:-SASL_PLAINTEXT}
sasl.mechanism=${ACL_SASL_MECHANISM:-PLAIN}
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="${ACL_ADMIN_PASSWORD:?set ACL_ADMIN_PASSWORD}";
PROPS

for _ in $(seq 60); do
  "$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$CONFIG" --list >/dev/null 2>&1 && break
  sleep 2
done

topic() {  # name partitions [config...]
  local name=$1 parts=$2
  shift 2
  "$BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$CONFIG" --create --if-not-exists \
    --topic "$name" --partitions "$parts" --replication-factor "$REPLICATION" "$@"
}
acl() {  # principal operations... -- resource options
  local user=$1
  shift
  local ops=()
  while [[ $1 != -- ]]; do ops+=(--operation "$1"); shift; done
  shift
  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --command-config "$CONFIG" --add \
    --allow-principal "User:$user" "${ops[@]}" "$@"
}

I=taoflow.interactions F=taoflow.feedback S=taoflow.scores U=taoflow.utilities A=taoflow.adapters
D=taoflow.dead-letters R=taoflow.learner.records X=taoflow.sessions
# the workers' internal repartition topics (rewards by operator, session steps by session, session joins by step)
W=taoflow.worker.rewards Y=taoflow.worker.sessions J=taoflow.worker.session-joins

for t in "$I" "$F" "$S" "$D" "$R" "$X" "$W" "$Y" "$J"; do topic "$t" "$PARTITIONS"; done
topic "$A" 1  # the adapter lifecycle: every gateway replays it in order
topic "$U" 1 --config cleanup.policy=compact

# agents: produce events, nothing else
acl sdk Write Describe -- --topic "$I" --topic "$F"

# gateway: its Emitter's events, adapter lifecycle events; follows utilities and adapters
acl gateway Write Describe -- --topic "$I" --topic "$F" --topic "$A"
acl gateway Read Describe -- --topic "$U" --topic "$A"

# workers: inputs in, scores/utilities/dead letters out, their own table changelogs; Parquet landing
acl worker Read Describe -- --topic "$I" --topic "$F" --topic "$S" --topic "$U" --topic "$D" --topic "$X"
acl worker Write -- --topic "$S" --topic "$U" --topic "$D" --topic "$X"
acl worker Read Write Describe Create -- --topic "$W" --topic "$Y" --topic "$J"
acl worker Describe Create -- --topic "$I" --topic "$F" --topic "$S" --topic "$U" --topic "$A" --topic "$D" \
  --topic "$R" --topic "$X"  # ensure_topics lists them and creates any that are missing (creating is not writing)
acl worker Read Write Create Describe DescribeConfigs -- --topic "$APP_ID-" --resource-pattern-type prefixed
acl worker Read -- --group "$APP_ID" --group "$APP_ID-parquet"

# lander: reads everything, writes nothing
acl lander Read Describe -- --topic "$I" --topic "$F" --topic "$S" --topic "$U" --topic "$A" --topic "$D" --topic "$R" \
  --topic "$X"
acl lander Read -- --group "$APP_ID-lander"

# learner: publishes adapters and hands its round rows to the lander
acl learner Write Describe -- --topic "$A" --topic "$R"
acl learner Describe Create -- --topic "$I" --topic "$F" --topic "$S" --topic "$U" --topic "$A" --topic "$D" \
  --topic "$R" --topic "$X"

echo "taoflow topics and ACLs are in place"
