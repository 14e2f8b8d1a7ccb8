using System;
using System.IO;
using System.Reflection;
using System.Runtime.InteropServices;
using Godot;
using Npcd;

namespace NpcdGodot
{
    /// <summary>The Npcd autoload: owns the one NpcdClient and polls it every frame on the
    /// main thread, before other nodes (process priority), so that line events and the
    /// NpcDialogue signals always fire on the main thread.</summary>
    public partial class NpcdService : Node
    {
        public NpcdClient Client { get; private set; }

        public override void _EnterTree()
        {
            ProcessPriority = -100;
            NativeLibrary.SetDllImportResolver(typeof(NpcdClient).Assembly, Resolve);
            string token = (string)ProjectSettings.GetSetting(NpcdSettings.Token, "");
            if (string.IsNullOrEmpty(token)) token = System.Environment.GetEnvironmentVariable("NPCD_TOKEN");
            string rootsPath = (string)ProjectSettings.GetSetting(NpcdSettings.RootCertsPemPath, "");
            string serverName = (string)ProjectSettings.GetSetting(NpcdSettings.TlsServerName, "");
            Client = new NpcdClient(new NpcdClientOptions((string)ProjectSettings.GetSetting(NpcdSettings.Address, "127.0.0.1:50051"))
            {
                InitialBackoffMs = (uint)(int)ProjectSettings.GetSetting(NpcdSettings.InitialBackoffMs, 250),
                MaxBackoffMs = (uint)(int)ProjectSettings.GetSetting(NpcdSettings.MaxBackoffMs, 5000),
                Token = string.IsNullOrEmpty(token) ? null : token,
                Tls = (bool)ProjectSettings.GetSetting(NpcdSettings.UseTls, false),
                RootCertsPem = string.IsNullOrEmpty(rootsPath) ? null : File.ReadAllText(ProjectSettings.GlobalizePath(rootsPath)),
                TlsServerName = string.IsNullOrEmpty(serverName) ? null : serverName,
            });
        }

        /// <summary>The personas the daemon serves, for an editor dropdown or a persona's voice:
        /// an Array of Dictionaries {"id", "display_name", "description", "metadata" (a
        /// Dictionary: voice_id, emotion_tags ...), "status" (1 ready, 2 failed to load), "error",
        /// "has_adapter"}. Waits for the daemon up to timeoutMs (GDScript passes it:
        /// <c>Npcd.ListPersonas(2000)</c>); call it from a menu, not every frame. When the
        /// daemon does not answer, returns an empty Array and pushes the error (its code: 14 not
        /// running, 16 a refused token).</summary>
        public Godot.Collections.Array<Godot.Collections.Dictionary> ListPersonas(int timeoutMs)
        {
            var list = new Godot.Collections.Array<Godot.Collections.Dictionary>();
            foreach (PersonaInfo p in Blocking("ListPersonas", () => Client.ListPersonas((uint)Math.Max(timeoutMs, 0)),
                                               new PersonaInfo[0]))
            {
                list.Add(new Godot.Collections.Dictionary
                {
                    ["id"] = p.Id,
                    ["display_name"] = p.DisplayName,
                    ["description"] = p.Description,
                    ["metadata"] = Json.ParseString(p.MetadataJson),
                    ["status"] = (int)p.Status,
                    ["error"] = p.Error,
                    ["has_adapter"] = p.HasAdapter,
                });
            }
            return list;
        }

        /// <summary>What every NPC remembers (the NpcDialogue nodes' Conversation), for the save file: a
        /// PackedByteArray to store as it is (only `persona`'s conversations unless it is ""). Empty, with
        /// the error pushed, when the daemon does not answer. GDScript: <c>Npcd.ExportConversations("", 5000)</c>.</summary>
        public byte[] ExportConversations(string persona, int timeoutMs)
        {
            return Blocking("ExportConversations", () => Client.ExportConversations(
                string.IsNullOrEmpty(persona) ? null : persona, (uint)Math.Max(timeoutMs, 0)), new byte[0]);
        }

        /// <summary>Restores a saved blob (replace: the daemon's memory becomes exactly the save's); returns
        /// how many conversations it held, or -1 with the error pushed (a corrupt blob: code 3, nothing lost).</summary>
        public int ImportConversations(byte[] blob, bool replace, int timeoutMs)
        {
            return Blocking("ImportConversations", () => Client.ImportConversations(blob, replace, (uint)Math.Max(timeoutMs, 0)), -1);
        }

        /// <summary>What one NPC remembers, for a journal or a quest log: an Array of Dictionaries {"speaker",
        /// "text", "npc" (true for the NPC's own replies)}, oldest first; empty, with the error pushed, when the
        /// daemon does not answer. GDScript: <c>Npcd.GetConversation("guard-1", "town_guard", 5000)</c>.</summary>
        public Godot.Collections.Array<Godot.Collections.Dictionary> GetConversation(string conversation, string persona, int timeoutMs)
        {
            var list = new Godot.Collections.Array<Godot.Collections.Dictionary>();
            var kept = Blocking("GetConversation", () => Client.GetConversation(conversation, persona, (uint)Math.Max(timeoutMs, 0)),
                                new ConversationTurns(new Turn[0], ""));
            foreach (Turn t in kept.Turns)
                list.Add(new Godot.Collections.Dictionary { ["speaker"] = t.Speaker, ["text"] = t.Text, ["npc"] = t.Npc });
            return list;
        }

        /// <summary>Adds a turn the NPC should remember without a line of its own (npc: words put in its mouth);
        /// false with the error pushed when refused.</summary>
        public bool AddTurn(string conversation, string persona, string speaker, string text, bool npc, int timeoutMs)
        {
            return Blocking("AddTurn", () =>
            {
                Client.AddTurn(conversation, persona, speaker, text, npc, (uint)Math.Max(timeoutMs, 0));
                return true;
            }, false);
        }

        /// <summary>Replaces what one NPC remembers: turns as GetConversation returns them (Dictionaries
        /// {"speaker", "text", "npc"}), oldest first, and a summary of what came before ("" for none); false with
        /// the error pushed when refused. GDScript:
        /// <c>Npcd.SetConversation("guard-1", "town_guard", [{"speaker": "Player", "text": "Hi."}], "", 5000)</c>.</summary>
        public bool SetConversation(string conversation, string persona, Godot.Collections.Array<Godot.Collections.Dictionary> turns,
                                    string summary, int timeoutMs)
        {
            return Blocking("SetConversation", () =>
            {
                var kept = new Turn[turns.Count];
                for (int i = 0; i < kept.Length; i++)
                {
                    var t = turns[i];
                    kept[i] = new Turn(t.ContainsKey("speaker") ? t["speaker"].AsString() : null,
                                       t.ContainsKey("text") ? t["text"].AsString() : null,
                                       t.ContainsKey("npc") && t["npc"].AsBool());
                }
                Client.SetConversation(conversation, persona, kept, summary, (uint)Math.Max(timeoutMs, 0));
                return true;
            }, false);
        }

        /// <summary>Makes one NPC forget its conversation; false with the error pushed when refused.</summary>
        public bool ResetConversation(string conversation, string persona, int timeoutMs)
        {
            return Blocking("ResetConversation", () =>
            {
                Client.ResetConversation(conversation, persona, (uint)Math.Max(timeoutMs, 0));
                return true;
            }, false);
        }

        // A call that waits for the daemon: its result, or `failed` with the daemon's refusal pushed as an error.
        private static T Blocking<T>(string call, Func<T> work, T failed)
        {
            try
            {
                return work();
            }
            catch (NpcdUnavailableException e)
            {
                GD.PushError("npcd: " + call + " failed (code " + e.Code + "): " + e.Message);
                return failed;
            }
        }

        public override void _Process(double delta)
        {
            Client.Poll();
        }

        public override void _ExitTree()
        {
            Client.Dispose();
            Client = null;
        }

        /// <summary>Finds the native library: in the addon's bin/ folder in the editor, next to
        /// the executable in an exported game.</summary>
        private static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path)
        {
            if (name != "npcd_client") return IntPtr.Zero;
            string file = OperatingSystem.IsWindows() ? "npcd_client.dll"
                : OperatingSystem.IsMacOS() ? "libnpcd_client.dylib" : "libnpcd_client.so";
            string platform = (OperatingSystem.IsWindows() ? "windows" : OperatingSystem.IsMacOS() ? "macos" : "linux")
                + "-" + RuntimeInformation.ProcessArchitecture.ToString().ToLowerInvariant();
            string[] candidates =
            {
                ProjectSettings.GlobalizePath("res://addons/npcd/bin/" + platform + "/" + file),
                Path.Combine(Path.GetDirectoryName(OS.GetExecutablePath()) ?? ".", file),
            };
            foreach (string candidate in candidates)
            {
                if (File.Exists(candidate) && NativeLibrary.TryLoad(candidate, out IntPtr handle)) return handle;
            }
            return IntPtr.Zero;
        }
    }
}
