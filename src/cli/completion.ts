/**
 * `sandboxd completion bash|zsh`: a completion script generated from the
 * command tree itself, so it never lists a command or option the CLI does
 * not have. Phase and approval ids are completed live from the daemon.
 */
import type { Command } from "commander";

interface Node {
  path: string[];
  subcommands: string[];
  options: string[];
  /** the first argument is a phase id (or an approval id) */
  takes: "phase" | "approval" | null;
}

function walk(cmd: Command, prefix: string[] = []): Node[] {
  const here: Node = {
    path: prefix,
    subcommands: cmd.commands.map((c) => c.name()),
    options: cmd.options.flatMap((o) => [o.short, o.long].filter((x): x is string => Boolean(x))).concat("--help"),
    takes: null,
  };
  const first = (cmd as unknown as { registeredArguments?: Array<{ name(): string }> }).registeredArguments?.[0]?.name() ?? "";
  if (/^(id|phase)$/.test(first)) here.takes = prefix[0] === "approvals" ? "approval" : "phase";
  return [here, ...cmd.commands.flatMap((c) => walk(c, [...prefix, c.name()]))];
}

const IDS = {
  phase: "sandboxd ps --all --json 2>/dev/null | grep -o '\"id\": \"ph_[0-9a-f]*\"' | cut -d'\"' -f4",
  approval: "sandboxd approvals ls --json 2>/dev/null | grep -o '\"id\": \"ap_[0-9a-f]*\"' | cut -d'\"' -f4",
};

export function bashCompletion(prog: Command): string {
  const nodes = walk(prog);
  const cases = nodes
    .map((n) => {
      const words = [...n.subcommands, ...n.options].join(" ");
      const ids = n.takes ? ` $(${IDS[n.takes]})` : "";
      return `    "${n.path.join(" ")}") words="${words}${ids}" ;;`;
    })
    .join("\n");
  return `# bash completion for sandboxd: eval "$(sandboxd completion bash)" (e.g. in ~/.bashrc)
_sandboxd() {
  local cur="\${COMP_WORDS[COMP_CWORD]}" path="" w i words
  # the deepest command path typed so far (options and their values skipped)
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="\${COMP_WORDS[i]}"
    [[ "$w" == -- ]] && return 0
    [[ "$w" == -* ]] && continue
    case "\${path:+$path }$w" in
${nodes
  .filter((n) => n.path.length > 0)
  .map((n) => `      "${n.path.join(" ")}") path="${n.path.join(" ")}" ;;`)
  .join("\n")}
    esac
  done
  case "$path" in
${cases}
    *) words="" ;;
  esac
  COMPREPLY=( $(compgen -W "$words" -- "$cur") )
}
complete -F _sandboxd sandboxd
`;
}

export function zshCompletion(prog: Command): string {
  return `#compdef sandboxd
# zsh completion for sandboxd: eval "$(sandboxd completion zsh)" (e.g. in ~/.zshrc)
autoload -U +X bashcompinit && bashcompinit
${bashCompletion(prog)}`;
}
