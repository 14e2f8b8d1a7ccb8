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
            PersonaInfo[] personas;
            try
            {
                personas = Client.ListPersonas((uint)Math.Max(timeoutMs, 0));
            }
            catch (NpcdUnavailableException e)
            {
                GD.PushError("npcd: ListPersonas failed (code " + e.Code + "): " + e.Message);
                return list;
            }
            foreach (PersonaInfo p in personas)
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
