#!/usr/bin/env bash
# Runs a private ClickHouse server in the foreground: its own data directory, loopback only,
# the given ports. Used by the test harness and by `scripts/run-local.sh`; never touches the
# system-wide server or its ports.
# EXTRA_CONFIG, if given, is merged over the generated config.xml (copied into config.d): a
# cluster node's ZooKeeper, macros, remote_servers and interserver port.
#   usage: clickhouse-server.sh DATA_DIR HTTP_PORT TCP_PORT [EXTRA_CONFIG]
set -euo pipefail
dir=$(realpath -m "$1"); http_port=$2; tcp_port=$3; extra=${4:-}
mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
# config.d holds only what this start was given, like the config.xml written below.
rm -rf "$dir/config.d"
if [ -n "$extra" ]; then
    mkdir -p "$dir/config.d"
    cp "$extra" "$dir/config.d/"
fi
cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$dir/log/server.log</log>
        <errorlog>$dir/log/server.err.log</errorlog>
        <size>10M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http_port</http_port>
    <tcp_port>$tcp_port</tcp_port>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <max_concurrent_queries>200</max_concurrent_queries>
    <keep_alive_timeout>10</keep_alive_timeout>
    <!-- Only the "logged" user below logs its queries: tests that must see what reached the
         server (an INSERT's format) connect as it; everything else stays unlogged. -->
    <query_log><database>system</database><table>query_log</table><flush_interval_milliseconds>7500</flush_interval_milliseconds></query_log>
</yandex>
XML
cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default><max_memory_usage>4000000000</max_memory_usage></default>
        <logged><max_memory_usage>4000000000</max_memory_usage><log_queries>1</log_queries></logged>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        <logged>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>logged</profile>
            <quota>default</quota>
        </logged>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
exec clickhouse-server --config-file="$dir/config.xml"
