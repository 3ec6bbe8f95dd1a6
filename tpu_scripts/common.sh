# Helpers sourced by the scripts in this directory (not run on its own).
#
#   parse_flags "$@"     --dry-run (print every command instead of running it), -h / --help
#   require VAR...       exit with a clear message when a required variable is unset or empty
#   run CMD ARGS...      run a command, or print it (one line, "+ " first) under --dry-run
#   exists ANSWER CMD... run a read-only check quietly and return its status; under --dry-run
#                        print it instead and return ANSWER (yes / no)

DRY_RUN=0

usage() {
  # The script's header: the comment block after the shebang and #SBATCH lines.
  sed -n '2,/^[^#]/p' "$0" | grep -v '^#SBATCH' | sed -e '/^[^#]/d' -e 's/^# \{0,1\}//'
}

parse_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) usage; exit 0 ;;
      *) echo "error: unknown argument '$arg' (flags: --dry-run, --help)" >&2; exit 2 ;;
    esac
  done
}

require() {
  local missing=() var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
  done
  if ((${#missing[@]})); then
    {
      echo "error: $(basename "$0") needs ${missing[*]} (not set)."
      echo "Set them in the environment, e.g. (see the top of $0):"
      echo
      usage | sed -n '/^Example/,$p'
    } >&2
    exit 1
  fi
}

quote() {
  # One shell word: bare when safe, else single-quoted, or double-quoted when that reads better
  # (the word has single quotes but nothing a double-quoted string would expand).
  local a="$1"
  if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$a"
  elif [[ "$a" != *"'"* ]]; then
    printf "'%s'" "$a"
  elif [[ "$a" != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

print_cmd() {
  local out="+" a
  for a in "$@"; do out+=" $(quote "$a")"; done
  echo "$out"
}

run() {
  if ((DRY_RUN)); then
    print_cmd "$@"
  else
    "$@"
  fi
}

exists() {
  local answer="$1"
  shift
  if ((DRY_RUN)); then
    print_cmd "$@"
    [[ "$answer" == yes ]]
    return
  fi
  "$@" >/dev/null 2>&1
}

gcloud_common_args() {
  # --zone and, when PROJECT is set, --project, for the gcloud compute tpus commands.
  GCLOUD_ARGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then GCLOUD_ARGS+=(--project="$PROJECT"); fi
}

remote_words() {
  # Words joined into one command line for `ssh --command`, each quoted for the remote shell.
  local out="" a
  for a in "$@"; do out+="${out:+ }$(quote "$a")"; done
  printf '%s' "$out"
}
